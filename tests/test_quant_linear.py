"""Quantized linears and the checkpoint bit formats.

* packing: pack -> unpack is bit-exact both ways, and agrees with loop-based readers/writers
  written from the format descriptions (tests/quant_ref.py).
* Int4Linear / Int8Linear: forward == x @ W.T + b, W the dequantized weight, on every path.
  Tolerances: fp32 (dequant path) 1e-5 of max |y|, i.e. matmul rounding only (W is exact in
  fp32). bf16: 2**-6 of max |y|: the kernel holds scales, zeros and x in bf16 (8-bit mantissa,
  2**-9 relative rounding each) and sums in fp32; the dequant path rounds W to bf16.
"""

import pytest
import torch

import quant_ref as ref
from qvl.quant import kernels
from qvl.quant.linear import Int4Linear, Int8Linear
from qvl.quant.packing import (awq_pack_cols, awq_unpack_cols, gptq_pack_cols, gptq_pack_rows,
                               gptq_unpack_cols, gptq_unpack_rows, pack_awq, pack_gptq, unpack_awq,
                               unpack_gptq)
from qvl.quant.weight import QuantizedWeight

TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def _words(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    w.view(-1)[:4] = torch.tensor([-1, -2**31, 0, 2**31 - 1], dtype=torch.int32)  # sign-bit edge cases
    return w


# -- packing -------------------------------------------------------------------------------

def test_awq_round_trips_and_matches_reference():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (48, 64), generator=g)
    packed = awq_pack_cols(q)
    assert packed.dtype == torch.int32 and packed.shape == (48, 8)
    assert torch.equal(packed, ref.awq_write(q))
    assert torch.equal(awq_unpack_cols(packed).long(), q)
    words = _words(16, 8)
    assert torch.equal(awq_unpack_cols(words).long(), ref.awq_read(words))
    assert torch.equal(awq_pack_cols(awq_unpack_cols(words)), words)
    z = torch.randint(0, 16, (3, 64), generator=g)
    qw, qz = pack_awq(q, z)
    q2, z2 = unpack_awq(qw, qz)
    assert torch.equal(q2.long(), q) and torch.equal(z2.long(), z)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_round_trips_and_matches_reference(bits):
    g = torch.Generator().manual_seed(bits)
    per = 32 // bits
    q = torch.randint(0, 2**bits, (4 * per, 24), generator=g)
    rows = gptq_pack_rows(q, bits)
    assert rows.dtype == torch.int32 and rows.shape == (4, 24)
    assert torch.equal(rows, ref.gptq_write_rows(q, bits))
    assert torch.equal(gptq_unpack_rows(rows, bits).long(), q)
    words = _words(6, 8, seed=bits)
    assert torch.equal(gptq_unpack_rows(words, bits).long(), ref.gptq_read_rows(words, bits))
    assert torch.equal(gptq_pack_rows(gptq_unpack_rows(words, bits), bits), words)
    assert torch.equal(gptq_unpack_cols(words, bits).long() + 1, ref.gptq_read_zeros(words, bits))
    assert torch.equal(gptq_pack_cols(gptq_unpack_cols(words, bits), bits), words)

    q = torch.randint(0, 2**bits, (4 * per, 8 * per), generator=g)
    zeros = torch.randint(1, 2**bits, (3, 8 * per), generator=g)
    qw, qz = pack_gptq(q, zeros, bits)
    assert torch.equal(qz, ref.gptq_write_zeros(zeros, bits))  # v1 stores zero - 1
    q2, z2 = unpack_gptq(qw, qz, bits)
    assert torch.equal(q2.long(), q) and torch.equal(z2.long(), zeros)


@pytest.mark.parametrize("bad", [0, 16])
def test_gptq_v1_rejects_unencodable_zeros(bad):
    z = torch.full((1, 8), 5)
    z[0, 3] = bad
    with pytest.raises(ValueError, match=r"zero points must be in \[1, 15\]"):
        pack_gptq(torch.zeros(8, 8, dtype=torch.long), z, 4)


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        awq_pack_cols(torch.full((1, 8), 16))


# -- linears ---------------------------------------------------------------------------------

def _qweight(n, k, bits, group, *, sym=False, act_order=False, seed=0, dtype_scale=torch.float16):
    g = torch.Generator().manual_seed(seed)
    ng = k // group
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    if sym:
        zeros = torch.full((ng, n), 2**(bits - 1), dtype=torch.int16)
    else:
        zeros = torch.randint(0, 2**bits, (ng, n), generator=g).to(torch.int16)
    scales = (torch.rand(ng, n, generator=g) * 0.02 + 0.002).to(dtype_scale)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32)
    return QuantizedWeight(q, zeros, scales, bits, group, g_idx)


def _check(m, w, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(2, 3, w.in_features, generator=g).to(dtype)
    want = x.double() @ w.dequantize().double().t()
    if bias is not None:
        want = want + bias.to(dtype).double()
    got = m(x)
    assert got.dtype == dtype and got.shape == (2, 3, w.out_features)
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * want.abs().max().item(), (m, err, want.abs().max().item())


CASES = [  # (out, in, group, sym, act_order)
    (64, 256, 32, False, False),
    (48, 256, 64, True, False),
    (32, 512, 128, False, True),
    (96, 256, 256, True, True),
    (32, 512, 512, False, False),  # group = whole row (-1): runs as 2 kernel groups of 256
]


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear], ids=["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}g{c[2]}{'s' if c[3] else 'a'}{'-act' if c[4] else ''}"
                                             for c in CASES])
def test_linear_matches_dequantized_matmul(cls, dtype, case):
    n, k, group, sym, act = case
    w = _qweight(n, k, cls.bits, group, sym=sym, act_order=act, seed=n + k)
    bias = torch.randn(n) if group != 64 else None
    m = cls.from_weight(w, bias, dtype)
    # bf16 on CPU takes the int4 kernel for every case here; fp32 only dequantizes
    assert m.kernel == ("int4pack" if dtype == torch.bfloat16 else "dequant"), m.fallback_reason
    _check(m, w, bias, dtype)
    fallback = cls.from_weight(w, bias, dtype, kernel="dequant")
    _check(fallback, w, bias, dtype)
    torch.testing.assert_close(fallback.dequantize(), w.dequantize(), atol=0, rtol=0)


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear], ids=["int4", "int8"])
def test_fallback_for_shapes_the_kernel_lacks(cls):
    # N % 16 != 0, group 16, and an act-order g_idx with unequal groups
    for w, why in [(_qweight(40, 128, cls.bits, 32), "multiple of 16"),
                   (_qweight(32, 128, cls.bits, 16), "not a multiple of 32"),
                   (QuantizedWeight(*_uneven(cls.bits)), "equal groups")]:
        m = cls.from_weight(w, None, torch.bfloat16)
        assert m.kernel == "dequant" and why in m.fallback_reason
        _check(m, w, None, torch.bfloat16)
        with pytest.raises(ValueError, match="cannot run"):
            cls.from_weight(w, None, torch.bfloat16, kernel="int4pack")


def _uneven(bits):
    w = _qweight(32, 128, bits, 32)
    g_idx = torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32)
    return w.q, w.zeros, w.scales, bits, 32, g_idx


def test_packed_sizes():
    n, k = 256, 1024
    for cls, per_weight in ((Int4Linear, 0.5), (Int8Linear, 1.0)):
        w = _qweight(n, k, cls.bits, 128)
        m = cls.from_weight(w, None, torch.bfloat16)
        scales_zeros = (k // 128) * n * 2 * 2 * (2 if cls is Int8Linear else 1)  # bf16 pairs
        assert m.nbytes() == n * k * per_weight + scales_zeros
        assert m.nbytes() <= n * k * 2 * cls.bits / 16 * 1.07  # ~bits/16 of fp16 plus scales


def test_kernel_path_rejects_other_dtypes():
    m = Int4Linear.from_weight(_qweight(32, 128, 4, 32), None, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        m(torch.randn(1, 128))


def test_kernel_group_splits_large_groups():
    assert kernels.kernel_group(128) == 128
    assert kernels.kernel_group(1536) == 256
    assert kernels.kernel_group(96) == 32
    assert kernels.kernel_group(16) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear], ids=["int4", "int8"])
def test_cuda_linear_matches_dequantized_matmul(cls):
    for case in CASES:
        n, k, group, sym, act = case
        w = _qweight(n, k, cls.bits, group, sym=sym, act_order=act)
        wc = QuantizedWeight(w.q.cuda(), w.zeros.cuda(), w.scales.cuda(), w.bits, w.group_size,
                             None if w.g_idx is None else w.g_idx.cuda())
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            m = cls.from_weight(wc, None, dtype)
            x = torch.randn(3, k, device="cuda").to(dtype)
            want = x.double() @ w.dequantize().double().cuda().t()
            err = (m(x).double() - want).abs().max().item()
            assert err <= 2**-6 * want.abs().max().item(), (m, err)
