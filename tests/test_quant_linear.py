"""Quantized linears and the checkpoint bit formats.

* packing: pack -> unpack is bit-exact both ways, and agrees with loop-based readers/writers
  written from the format descriptions (tests/quant_ref.py).
* Int4Linear / Int8Linear: forward == x @ W.T + b, W the dequantized weight, on every path.
  Tolerances: fp32 1e-5 of max |y|: W is exact in fp32, so paths differ only in how products
  and sums round (qvl's kernel sums q * x per group, then scales). bf16: 2**-6 of max |y|:
  torch's int4 kernel holds scales, zeros and x in bf16 (8-bit mantissa, 2**-9 relative
  rounding each) and sums in fp32; the dequant path rounds W to bf16; the qvl kernel rounds
  only its output to bf16.
* qvl's CPU kernel: both layouts round-trip, dequantize bit-exactly, and the GEMV (1..8 rows)
  and the prefill path (dequantize + GEMM) equal the plain formula.
"""

import pytest
import torch

import quant_ref as ref
from qvl.quant import cpu, kernels
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
    # auto: qvl's kernel where it builds and takes the group (4-bit blocks of 64 columns), else
    # torch's int4 kernel for bf16, else dequantize
    qvl_ok = cpu.unavailable() is None and group % (64 if cls.bits == 4 else 32) == 0
    want = "qvl" if qvl_ok else "int4pack" if dtype == torch.bfloat16 else "dequant"
    assert m.kernel == want, m.fallback_reason
    _check(m, w, bias, dtype)
    for kernel in ("qvl", "int4pack"):
        if kernel != m.kernel and (kernel == "int4pack" and dtype == torch.bfloat16 or kernel == "qvl" and qvl_ok):
            _check(cls.from_weight(w, bias, dtype, kernel=kernel), w, bias, dtype)
    fallback = cls.from_weight(w, bias, dtype, kernel="dequant")
    _check(fallback, w, bias, dtype)
    torch.testing.assert_close(fallback.dequantize(), w.dequantize(), atol=0, rtol=0)
    if m.kernel == "qvl":  # the kernel's layout decodes back to the checkpoint's weight
        torch.testing.assert_close(m.dequantize(), w.dequantize(), atol=0, rtol=0)
        back = m.quantized_weight()
        torch.testing.assert_close(back.dequantize(), w.dequantize(), atol=0, rtol=0)
        assert torch.equal(back.q, w.q) and torch.equal(back.zeros, w.zeros.to(torch.int16))


needs_qvl_kernel = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"qvl CPU kernel: {cpu.unavailable()}")


@pytest.mark.parametrize("bits", [4, 8])
def test_qvl_kernel_layout_round_trips(bits):
    q = torch.randint(0, 2**bits, (8, 256), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = cpu.pack(q, bits)
    assert packed.shape == (2, 256 * bits // 8 // 32, 4, 32)
    assert torch.equal(cpu.unpack(packed, bits, 256), q)
    if bits == 4:  # byte j of a 64-column chunk: column j low, column j + 32 high
        assert int(packed[0, 0, 1, 5]) == int(q[1, 5]) | int(q[1, 37]) << 4  # row 1, first chunk


@needs_qvl_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qvl_kernel_every_row_count(bits, dtype):
    """1..GEMV_MAX_M rows run the GEMV, more the dequantize + GEMM path; extreme codes and zero
    points (0 and 2**bits - 1) included. With bf16 x the GEMV's products are exact in fp32, so
    its bf16 output is held to bf16's own rounding of the exact result."""
    n, k, group = 64, 512, 128
    w = _qweight(n, k, bits, group, seed=bits)
    w.q[0], w.zeros[0, 1], w.zeros[1, 2] = 2**bits - 1, 0, 2**bits - 1
    bias = torch.randn(n)
    m = (Int4Linear if bits == 4 else Int8Linear).from_weight(w, bias, dtype, kernel="qvl")
    for rows in (1, 2, 3, cpu.GEMV_MAX_M, cpu.GEMV_MAX_M + 1, 40):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        want = x.double() @ w.dequantize().double().t() + bias.double()
        got = m(x).double()
        if rows <= cpu.GEMV_MAX_M:
            tol = 2e-6 if dtype == torch.float32 else 2**-8
            assert ((got - want).abs() <= tol * want.abs() + 1e-5 * want.abs().max()).all(), rows
        else:
            _check(m, w, bias, dtype)


@needs_qvl_kernel
def test_qvl_kernel_rejects_shapes_and_values_it_cannot_hold():
    assert "N % 4" in cpu.unsupported_reason(4, 30, 256, 64, torch.zeros(4, 30), torch.ones(4, 30))
    assert "group % 64" in cpu.unsupported_reason(4, 32, 256, 32, torch.zeros(8, 32), torch.ones(8, 32))
    assert "0..255" in cpu.unsupported_reason(8, 32, 256, 128, torch.full((2, 32), 256), torch.ones(2, 32))
    assert "fp16" in cpu.unsupported_reason(4, 32, 256, 128, torch.zeros(2, 32), torch.full((2, 32), 1 + 2**-20))
    with pytest.raises(ValueError, match="qvl kernel cannot run"):
        Int4Linear.from_weight(_qweight(32, 128, 4, 32), None, torch.bfloat16, kernel="qvl")


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear], ids=["int4", "int8"])
def test_fallback_for_shapes_the_kernel_lacks(cls):
    # N % 16 != 0, group 16, and an act-order g_idx with unequal groups
    for w, why in [(_qweight(42, 128, cls.bits, 32), "multiple of 16"),
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
        m = cls.from_weight(w, None, torch.bfloat16, kernel="int4pack")
        scales_zeros = (k // 128) * n * 2 * 2 * (2 if cls is Int8Linear else 1)  # bf16 pairs
        assert m.nbytes() == n * k * per_weight + scales_zeros
        assert m.nbytes() <= n * k * 2 * cls.bits / 16 * 1.07  # ~bits/16 of fp16 plus scales
        if cpu.unavailable() is None:
            m = cls.from_weight(w, None, torch.bfloat16, kernel="qvl")
            assert m.nbytes() == n * k * per_weight + (k // 128) * n * 3  # fp16 scale + uint8 zero
            assert m.nbytes() <= n * k * 2 * cls.bits / 16 * 1.05


def test_kernel_path_rejects_other_dtypes():
    for kernel in ("int4pack", "qvl"):
        if kernel == "qvl" and cpu.unavailable() is not None:
            continue
        m = Int4Linear.from_weight(_qweight(32, 128, 4, 64), None, torch.bfloat16, kernel=kernel)
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
