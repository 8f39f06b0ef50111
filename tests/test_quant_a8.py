"""qvl's 8-bit-activation kernel (quant_kernel "qvl-a8", quant/qgemv.c's qvl_a8_*), every build.

Builds: AVX-512 with VNNI (vpdpbusd), AVX-512 without it (``-mno-avx512vnni``: vpmaddubsw), AVX2
+ AVX-VNNI and AVX2 + FMA only, each where this CPU runs it.

What is checked, and how tightly:
* The activation rounding equals torch's, bit for bit: per block of ``ablock`` columns
  d = max|x| / 127 (fp32), xq = round-half-even(x * (1 / d)), and the block sums of xq.
* The product equals the integer reference: y = sum over blocks of (s * d) * sum (q - z) * xq,
  the inner sums exact integers, in float64. The kernel rounds (s * d) once and each of its
  fp32 fused multiply-adds once, and the bias's addition once, so |err| <= (blocks + 2) * 2**-24 *
  sum |terms| + 2**-24 |y| (bf16 output: plus 2**-8 |y|).
* Against the float product with the dequantized weight, x @ W.T: each x moves by at most half
  a step, d / 2, so |err| <= sum_k |W[n, k]| * d(k) / 2 (+ the slack above); and for Gaussian x
  the relative error of the whole output is under 1.5% (measured ~0.5% with blocks of 32).
* One row answers the same bits in any batch (M = 1 included), on any thread count, and in
  every build (only the integer part differs between them, and it is exact).
* M = 1..8, 13, 31, 64 and 100 rows, N not a multiple of the 64-output tile, groups of one
  block, several and the whole row, extreme codes and zero points, an all-zero row, bias.
* The linears with kernel="qvl-a8": forward (the kernel up to cpu.A8_MAX_M rows, then W.T
  dequantized bit-exactly for torch's GEMM), act-order checkpoints, the layout decoding back.
"""

import os
import shutil

import pytest
import torch

from qvl.quant import cpu
from qvl.quant.linear import Int4Linear, Int8Linear
from qvl.quant.weight import QuantizedWeight

CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
X86 = os.uname().machine.lower() in ("x86_64", "amd64")
FLAGS = cpu._cpu_flags() or set()

pytestmark = [pytest.mark.skipif(not CC, reason="no C compiler to build qvl's CPU kernel"),
              pytest.mark.skipif(not X86, reason="qvl's CPU kernel is x86-64 only")]

BUILDS = {  # id -> (variant, extra compiler flags, CPU flags the build needs beyond the variant's)
    "avx512-vnni": ("avx512", (), ("avx512_vnni",)),
    "avx512": ("avx512", ("-mno-avx512vnni",), ()),
    "avxvnni": ("avxvnni", (), ()),
    "avx2": ("avx2", (), ()),
}


def _open(name):
    variant, extra, needs = BUILDS[name]
    lacks = (set(cpu.VARIANTS[variant][2]) | set(needs)) - FLAGS
    if lacks:
        pytest.skip(f"this CPU lacks {', '.join(sorted(lacks))} for the {name} build")
    return cpu.open_variant(variant, extra)


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request):
    return request.param, _open(request.param)


def _weight(n, k, group, bits, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.002).half().float()
    q[0] = 2**bits - 1
    q[-1, : k // 2] = 0
    zeros[0, 0] = 0
    zeros[-1, -1] = 2**bits - 1
    return q, zeros, scales


def _x(m, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).add(0.1) * 4
    x[0, : k // 3] *= 50  # one block much larger than the rest
    if m > 2:
        x[2] = 0  # all-zero blocks: scale 0, codes 0
    return x.to(dtype)


def quantize_ref(x, ablock):
    """torch's rounding of x [M, K] per block: codes, scales d, sums."""
    m, k = x.shape
    xb = x.float().reshape(m, k // ablock, ablock)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return xq.reshape(m, k).to(torch.int8), d, xq.sum(-1).to(torch.int32)


def integer_ref(x, q, zeros, scales, group, ablock):
    """(y, sum |terms|) in float64: y = sum_b (s * d) * sum_{k in b} (q - z) * xq, exact integers inside."""
    xq, d, _ = quantize_ref(x, ablock)
    m, k = x.shape
    n = q.shape[0]
    w_int = q.double() - zeros.double().repeat_interleave(group, 0).t()  # [N, K] integers
    dots = torch.einsum("mbk,nbk->mnb", xq.double().reshape(m, -1, ablock), w_int.reshape(n, -1, ablock))
    s = scales.double().repeat_interleave(group // ablock, 0).t()  # [N, blocks]
    terms = dots * s[None] * d.double()[:, None, :]
    return terms.sum(-1), terms.abs().sum(-1)


def _run(lib, x, q, zeros, scales, bits, group, ablock, bias=None):
    z, s = cpu.params_a8(zeros, scales)
    return cpu.a8_gemm(x, cpu.pack_a8(q, bits), s, z, bits, group, q.shape[0], bias, ablock, lib=lib)


SHAPES = [(4, 64, 32), (20, 192, 64), (72, 384, 128), (100, 256, 256), (130, 1536, 1536), (64, 512, 128)]
ROWS = (*range(1, 9), 13, 31, 64, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_rounding_equals_torch(build, dtype):
    _, lib = build
    for ablock in (32, 64, 128, 256):
        x = _x(7, 512, seed=ablock, dtype=dtype)
        x[1, :8] = torch.tensor([0.5, -0.5, 1.5, -2.5, 1.0, 0.0, -1.0, 0.25]) * (x[1, :ablock].abs().max() / 127)
        xq, sx, sq = cpu.a8_quantize(x, ablock, lib=lib)
        rq, rd, rs = quantize_ref(x, ablock)
        assert torch.equal(xq, rq) and torch.equal(sx, rd) and torch.equal(sq, rs), ablock


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_the_integer_reference_and_the_float_product(build, bits, dtype):
    _, lib = build
    for i, (n, k, group) in enumerate(SHAPES):
        q, zeros, scales = _weight(n, k, group, bits, seed=31 * i + bits)
        w = (q.double() - zeros.double().repeat_interleave(group, 0).t()) * scales.double().repeat_interleave(group, 0).t()
        bias = torch.randn(n, generator=torch.Generator().manual_seed(i)) if i % 2 else None
        for ablock in sorted({32, min(group, 128), min(group, 256)}):
            for m in ROWS:
                x = _x(m, k, seed=m + k, dtype=dtype)
                got = _run(lib, x, q, zeros, scales, bits, group, ablock, bias)
                assert got.dtype == dtype and got.shape == (m, n)
                b = 0 if bias is None else bias.double()
                ref, mag = integer_ref(x, q, zeros, scales, group, ablock)
                ref = ref + b
                slack = ((k // ablock + 2) * 2**-24 * mag + 2**-24 * ref.abs()  # + the bias's addition
                         + (0 if dtype == torch.float32 else 2**-8 * ref.abs()))
                err = (got.double() - ref).abs()
                assert (err <= slack + 1e-30).all(), (n, k, group, ablock, m, (err - slack).max().item())
                # the float product: each x moved by at most half its block's step
                _, d, _ = quantize_ref(x, ablock)
                step = d.double().repeat_interleave(ablock, 1)  # [M, K]
                flt = x.double() @ w.t() + b
                bound = (step / 2) @ w.abs().t() + slack + 1e-30
                assert ((got.double() - flt).abs() <= bound).all(), (n, k, group, ablock, m)
            xg = torch.randn(8, k, generator=torch.Generator().manual_seed(k)).to(dtype)  # plain Gaussian x
            got = _run(lib, xg, q, zeros, scales, bits, group, ablock)
            flt = xg.double() @ w.t()
            rel = (got.double() - flt).norm() / flt.norm()
            assert rel < 0.015, (n, k, group, ablock, rel.item())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_answers_the_same_in_any_batch_thread_count_and_build(bits):
    """Batched decode: a row's bits do not depend on its neighbours, the thread count or the build."""
    n, k, group = 200, 1024, 128
    q, zeros, scales = _weight(n, k, group, bits, seed=5)
    x = _x(cpu.A8_MAX_M, k, seed=11)
    libs = []
    for name in BUILDS:
        variant, extra, needs = BUILDS[name]
        if not (set(cpu.VARIANTS[variant][2]) | set(needs)) - FLAGS:
            libs.append((name, cpu.open_variant(variant, extra)))
    assert libs
    full = _run(libs[0][1], x, q, zeros, scales, bits, group, 32)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for name, lib in libs:
                assert torch.equal(_run(lib, x, q, zeros, scales, bits, group, 32), full), (name, t)
                for lo, hi in [(0, 1), (5, 6), (0, 2), (1, 4), (3, 7), (2, 8), (9, 40), (63, 64)]:
                    got = _run(lib, x[lo:hi].contiguous(), q, zeros, scales, bits, group, 32)
                    assert torch.equal(got, full[lo:hi]), (name, t, lo, hi)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_round_trips_and_dequantizes_exactly(build, bits):
    _, lib = build
    for n, k, group in [(4, 64, 32), (100, 256, 128), (130, 1536, 1536)]:
        q, zeros, scales = _weight(n, k, group, bits, seed=n)
        wp = cpu.pack_a8(q, bits)
        assert wp.shape == (-(-n // 64), k * bits // 32, 4, 16, 4)
        assert torch.equal(cpu.unpack_a8(wp, bits, n), q)
        z, s = cpu.params_a8(zeros, scales)
        z2, s2 = cpu.unparams_a8(z, s, n)
        assert torch.equal(z2, zeros.to(torch.int16)) and torch.equal(s2, scales)
        w32 = (q.float() - zeros.float().repeat_interleave(group, 0).t()) * scales.repeat_interleave(group, 0).t()
        for dtype in (torch.float32, torch.bfloat16):
            d = cpu.a8_dequantize_t(wp, s, z, bits, n, k, group, dtype, lib=lib)
            assert torch.equal(d, w32.t().to(dtype)), (n, k, group, dtype)


def test_refuses_shapes_it_cannot_hold(build):
    _, lib = build
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    p = buf.data_ptr()
    for bits, m, k, n, group, ablock in [(4, 1, 128, 8, 16, 16),   # group % 32
                                         (4, 1, 128, 8, 64, 48),   # block % 32
                                         (4, 1, 512, 8, 512, 512),  # block > 256
                                         (8, 1, 128, 8, 64, 128),  # group % block
                                         (4, 1, 192, 8, 128, 32),  # K % group
                                         (3, 1, 128, 8, 64, 32),   # bits
                                         (8, 0, 128, 8, 64, 32)]:  # no rows
        assert lib.qvl_a8_gemm(bits, p, 0, m, k, p, p, p, n, group, ablock, None, p, 0, 1) == -1
    assert lib.qvl_a8_gemm(4, p, 0, 1, 64, p, p, p, 1, 32, 32, None, p, 0, 1) == 0  # one output is enough
    assert cpu.a8_block(128) == 32 and cpu.a8_block(96) == 32 and cpu.a8_block(16) is None


needs_kernel = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"qvl CPU kernel: {cpu.unavailable()}")


def _qweight(n, k, bits, group, act_order, seed):
    q, zeros, scales = _weight(n, k, group, bits, seed)
    g_idx = None
    if act_order:
        g = torch.Generator().manual_seed(seed)
        g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32)
    return QuantizedWeight(q, zeros.to(torch.int16), scales.half(), bits, group, g_idx)


@needs_kernel
@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear], ids=["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_runs_the_a8_kernel(cls, dtype):
    for n, k, group, act in [(72, 256, 64, False), (96, 512, 128, True), (32, 512, 512, False)]:
        w = _qweight(n, k, cls.bits, group, act, seed=n + k)
        bias = torch.randn(n)
        m = cls.from_weight(w, bias, dtype, kernel="qvl-a8")
        assert m.kernel == "qvl-a8" and m.bias.dtype == torch.float32
        back = m.quantized_weight()
        assert torch.equal(back.q, w.q) and torch.equal(back.zeros, w.zeros)
        torch.testing.assert_close(m.dequantize(), w.dequantize(), atol=0, rtol=0)
        wd = w.dequantize().double()
        for rows in (1, 5, cpu.A8_MAX_M, cpu.A8_MAX_M + 1):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
            want = x.double() @ wd.t() + bias.to(dtype).double()
            got = m(x)
            assert got.dtype == dtype and got.shape == (rows, n)
            # x rounded to int8 per 32 columns (above A8_MAX_M rows, W in x's dtype instead)
            assert (got.double() - want).norm() <= 0.02 * want.norm(), (n, k, group, rows)
        if m.perm is None:  # the kernel itself: rows of x in the checkpoint's column order
            x = torch.randn(3, k).to(dtype)
            assert torch.equal(m(x), cpu.a8_gemm(x, m.weight, m.kscales, m.kzeros, cls.bits, group, n, m.bias))


@needs_kernel
def test_auto_stays_on_the_exact_kernel():
    w = _qweight(64, 256, 4, 128, False, seed=1)
    assert Int4Linear.from_weight(w, None, torch.bfloat16).kernel == "qvl"
    with pytest.raises(ValueError, match="qvl-a8"):
        Int4Linear.from_weight(_qweight(64, 256, 4, 16, False, seed=1), None, torch.bfloat16, kernel="qvl-a8")
