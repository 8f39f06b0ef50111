"""qvl's CPU kernel, each build variant (quant/qgemv.c's AVX-512 and AVX2 + FMA paths) on its own.

Every variant that can run on this CPU is built and opened directly (``cpu.open_variant``), so
an AVX-512 machine checks the AVX2 path too; the AVX2 variant is compiled with ``-mavx2 -mfma``
and nothing else, and its object code is checked for AVX-512 instructions.

Tolerances, against x @ W.T (+ bias) in float64, W = s * (q - z) the dequantized weight:
* fp32 x: |err| <= 2e-6 |y| + 1e-5 max|y|: each product rounds once, sums (per group, then
  across groups) accumulate in fp32 over K <= 1536 columns.
* bf16 x: |err| <= 2**-8 |y| + 1e-5 max|y|: products are exact in fp32 (both variants), sums in
  fp32, then the output rounds once to bf16 (2**-9 relative).
* dequantize: bit-exact (fp32 W is (q - z) * s rounded once; bf16 W is that rounded once).
Covered: 4 and 8 bits, fp32 and bf16 x, M = 1..8 and 40 rows (GEMV; a row equal in every batch of 2..8) and the prefill path
(dequantize + torch GEMM), one-block and several-block shapes, groups of one chunk, several
chunks and the whole row, extreme codes and zero points, a subnormal fp16 scale, with and
without bias; shapes the layout cannot hold are refused with -1 by both entry points.
"""

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qvl.quant import cpu

CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
X86 = os.uname().machine.lower() in ("x86_64", "amd64")
FLAGS = cpu._cpu_flags() or set()

pytestmark = [pytest.mark.skipif(not CC, reason="no C compiler to build qvl's CPU kernel"),
              pytest.mark.skipif(not X86, reason="qvl's CPU kernel is x86-64 only")]


@pytest.fixture(scope="module", params=list(cpu.VARIANTS))
def variant(request):
    name = request.param
    lacks = set(cpu.VARIANTS[name][2]) - FLAGS
    if lacks:
        pytest.skip(f"this CPU lacks {', '.join(sorted(lacks))} for the {name} variant")
    return name, cpu.open_variant(name)


SHAPES = {  # bits -> (N, K, group): one block of rows, several, groups of 1 / 3 chunks / the whole row
    4: [(4, 64, 64), (12, 192, 64), (20, 384, 192), (64, 512, 128), (8, 1536, 1536)],
    8: [(4, 32, 32), (12, 96, 32), (20, 288, 96), (64, 512, 128), (8, 1536, 1536)],
}


def _weight(n, k, group, bits, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.002).half()
    q[0] = 2**bits - 1
    q[-1, : k // 2] = 0
    zeros[0, 0] = 0
    zeros[-1, -1] = 2**bits - 1
    scales[0, -1] = 2**-20  # fp16 subnormal: the AVX2 path decodes fp16 in software
    w = (q.double() - zeros.double().repeat_interleave(group, 0).t()) * scales.double().repeat_interleave(group, 0).t()
    z, s = cpu.params(zeros, scales.float())
    return cpu.pack(q, bits), s, z, w, (q, zeros, scales)


def _close(got, want, dtype):
    rel = 2e-6 if dtype == torch.float32 else 2**-8
    err = (got.double() - want).abs()
    bound = rel * want.abs() + 1e-5 * want.abs().max()
    assert (err <= bound).all(), (err.max().item(), want.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_variant_equals_dequantized_matmul(variant, bits, dtype):
    name, lib = variant
    for i, (n, k, group) in enumerate(SHAPES[bits]):
        wp, s, z, w, (q, zeros, scales) = _weight(n, k, group, bits, seed=17 * i + bits)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(i)) if i % 2 else None
        for m in (*range(1, cpu.GEMV_MAX_M + 1), 40):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            want = x.double() @ w.t() + (0 if bias is None else bias.double())
            got = cpu.qgemm(x, wp, s, z, bits, group, bias, lib=lib)
            assert got.dtype == dtype and got.shape == (m, n)
            _close(got, want, dtype)
        # prefill: the dequantized weight, bit-exact, feeding torch's GEMM
        w32 = (q.float() - zeros.float().repeat_interleave(group, 0).t()) * scales.float().repeat_interleave(group, 0).t()
        d32 = cpu.dequantize(wp, s, z, bits, k, group, torch.float32, lib=lib)
        assert torch.equal(d32, w32), (name, n, k, group)
        d = cpu.dequantize(wp, s, z, bits, k, group, dtype, lib=lib)
        assert torch.equal(d, w32.to(dtype)), (name, n, k, group)
        x = torch.randn(40, k, generator=torch.Generator().manual_seed(40)).to(dtype)
        want = x.double() @ d.double().t() + (0 if bias is None else bias.double())
        got = F.linear(x, d, None if bias is None else bias.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 2**-6  # torch's GEMM on the dequantized weight
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_answers_the_same_in_any_batch_of_several(variant, bits):
    """Batched decode: a row of x gets the same fp32 result whichever other rows (two or more in
    all) share the call, so a request's tokens do not depend on its neighbours' number."""
    _, lib = variant
    n, k, group = 64, 512, 128
    wp, s, z, _, _ = _weight(n, k, group, bits, seed=3)
    x = torch.randn(cpu.GEMV_MAX_M, k, generator=torch.Generator().manual_seed(9))
    full = cpu.qgemm(x, wp, s, z, bits, group, lib=lib)
    for lo, hi in [(0, 2), (1, 4), (3, 7), (2, 8), (5, 8)]:
        assert torch.equal(cpu.qgemm(x[lo:hi].contiguous(), wp, s, z, bits, group, lib=lib), full[lo:hi]), (lo, hi)


def test_variant_refuses_shapes_it_cannot_hold(variant):
    _, lib = variant
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    p = buf.data_ptr()

    def gemm(bits, m, k, n, group):
        return lib.qvl_qgemm(bits, p, 0, m, k, p, p, p, n, group, None, p, 0, 1)

    def deq(bits, k, n, group):
        return lib.qvl_dequant(bits, p, p, p, n, k, group, p, 0, 1)

    for bits, m, k, n, group in [(4, 1, 128, 6, 64),    # N % 4
                                 (4, 1, 128, 8, 32),    # 4-bit group % 64
                                 (8, 1, 128, 8, 16),    # 8-bit group % 32
                                 (4, 1, 192, 8, 128),   # K % group
                                 (3, 1, 128, 8, 64),    # bits
                                 (8, 0, 128, 8, 64)]:   # no rows
        assert gemm(bits, m, k, n, group) == -1, (bits, m, k, n, group)
        if m:
            assert deq(bits, k, n, group) == -1, (bits, k, n, group)
    assert gemm(4, 1, 128, 8, 64) == 0 and deq(8, 64, 4, 32) == 0  # and takes the smallest it holds


AVX512_ONLY = ("zmm", "%k0", "%k1", "%k2", "%k3", "%k4", "%k5", "%k6", "%k7", "mm16", "mm17", "mm31",
               "vpternlog", "vdpbf16ps", "vcvtne2ps2bf16", "vpmovdw", "kmov", "{1to")


def test_avx2_variant_is_built_without_avx512():
    assert cpu.VARIANTS["avx2"][:2] == (256, ("-mavx2", "-mfma"))  # no -march=native, no other ISA flag
    so = cpu._build("avx2")
    assert ctypes.CDLL(str(so)).qvl_isa() == 256
    objdump = shutil.which("objdump")
    if objdump:
        text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                              timeout=120).stdout
        assert "vfmadd" in text and "ymm" in text
        found = [s for s in AVX512_ONLY if s in text]
        assert not found, found


def test_variant_choice_follows_flags_and_env(monkeypatch):
    monkeypatch.delenv(cpu.ISA_ENV, raising=False)
    for flags, want in [({"avx512f", "avx512bw", "f16c", "avx2", "fma"}, "avx512"),
                        ({"avx2", "fma", "f16c"}, "avx2"),
                        ({"avx2", "sse4_2"}, None)]:
        monkeypatch.setattr(cpu, "_cpu_flags", lambda f=flags: f)
        got, why = cpu.choose_variant()
        assert got == want and (why is None) == (want is not None), (flags, got, why)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx512f", "avx512bw", "f16c", "avx2", "fma"})
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    assert cpu.choose_variant() == ("avx2", None)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv(cpu.ISA_ENV, "avx512")
    got, why = cpu.choose_variant()
    assert got is None and "avx512f" in why
    monkeypatch.setenv(cpu.ISA_ENV, "sse")
    assert cpu.choose_variant()[0] is None


_LINEAR = """
import torch
from qvl.quant import cpu
{patch}
from qvl.quant.linear import Int4Linear
from qvl.quant.weight import QuantizedWeight
g = torch.Generator().manual_seed(0)
w = QuantizedWeight(torch.randint(0, 16, (32, 256), generator=g, dtype=torch.uint8),
                    torch.randint(0, 16, (2, 32), generator=g).to(torch.int16),
                    (torch.rand(2, 32, generator=g) * 0.02 + 0.002).half(), 4, 128, None)
for dtype in (torch.float32, torch.bfloat16):
    m = Int4Linear.from_weight(w, None, dtype)
    for rows in (1, 12):
        x = torch.randn(rows, 256, generator=g).to(dtype)
        want = x.double() @ w.dequantize().double().t()
        assert (m(x).double() - want).abs().max() <= 2**-6 * want.abs().max()
    print(cpu.isa(), dtype, m.kernel, cpu.unavailable())
"""


def _run(patch="", **env):
    r = subprocess.run([sys.executable, "-c", _LINEAR.format(patch=patch)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


@pytest.mark.skipif(not {"avx2", "fma"} <= FLAGS, reason="this CPU lacks AVX2 + FMA")
def test_env_forces_the_avx2_variant_for_the_linears():
    assert _run(QVL_CPU_ISA="avx2") == ["avx2 torch.float32 qvl None", "avx2 torch.bfloat16 qvl None"]


def test_cpus_with_neither_isa_fall_back_to_torch():
    out = _run(patch="cpu._cpu_flags = lambda: {'sse2', 'sse4_2'}")
    assert out[0].startswith("None torch.float32 dequant") and "neither AVX-512" in out[0]
    assert out[1].split()[:2] == ["None", "torch.bfloat16"] and out[1].split()[2] in ("int4pack", "dequant")
