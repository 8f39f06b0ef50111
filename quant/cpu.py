"""qvl's own CPU kernel for 4- and 8-bit weights (``qgemv.c``): built on first use, then cached.

torch's CPU int4 kernel runs only with bf16 activations (fp32 would dequantize per call), takes
8-bit weights only as two nibbles (two passes), and is slow at prefill. qvl carries a small
SIMD GEMV instead (fp32 or bf16 activations, exact fp32 products, 8-bit as bytes, AutoGPTQ /
AutoAWQ group semantics; 4-bit decode streams as fast as torch's kernel or slightly faster) and,
for many-token products (prefill), a dequantizer feeding torch's dense GEMM. Figures:
bench/results/quant.md.

The C file has two code paths, built as three variants (:data:`VARIANTS`): ``avx512`` (AVX-512 F,
BW + F16C, compiled with ``-march=native``), ``avxvnni`` (the AVX2 path with AVX-VNNI's vpdpbusd for
the 8-bit-activation kernel) and ``avx2`` (AVX2 + FMA, compiled with ``-mavx2 -mfma`` only, for the
x86 CPUs without AVX-512). The CPU's flags in /proc/cpuinfo pick the first that runs here;
``QVL_CPU_ISA=avx2`` (or ``avx512``, ``avxvnni``) forces one, e.g. to check the AVX2 build on an
AVX-512 machine. Each variant is compiled with the system C compiler (``$CC``, else ``cc``)
into ``$QVL_KERNEL_CACHE`` (default ``~/.cache/qvl/kernels``), keyed by the variant, sources,
compiler and CPU, atomically (temp file, then rename). No compiler, neither
ISA, a failed self-check, or ``QVL_CPU_KERNEL=0``: :func:`unavailable` says why and the linears
use torch's kernels instead.

The 8-bit-activation kernel (quant_kernel "qvl-a8": :func:`pack_a8`, :func:`a8_gemm`) rounds x to
int8 per block and keeps the weights in a layout of its own; figures in bench/results/a8.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# one library: the quantized products, the decode step's small operations (qvl.quant.decode_ops)
# and the loop over the layers that calls both (qvl.quant.decode_step)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("qgemv.c", "ops.c", "step.c"))
# rows of x up to which the GEMV (its weights re-read from cache for each row) is used; dequantize +
# GEMM breaks even at 12-16 rows on a 2B MLP matrix (2 cores), so 8 keeps to the safe side
GEMV_MAX_M = 8
# name -> (what its qvl_isa() returns, the compiler's target flags, the /proc/cpuinfo flags it needs),
# in the order auto-detection tries them
VARIANTS = {
    "avx512": (512, ("-march=native",), ("avx512f", "avx512bw", "f16c")),
    # the AVX2 code, with vpdpbusd for the 8-bit-activation kernel (Alder Lake and later, N100/N305)
    "avxvnni": (256, ("-mavx2", "-mfma", "-mavxvnni"), ("avx2", "fma", "avx_vnni")),
    "avx2": (256, ("-mavx2", "-mfma"), ("avx2", "fma")),
}
ISA_ENV = "QVL_CPU_ISA"
_lib: ctypes.CDLL | None = None
_isa: str | None = None
_reason: str | None = None
_loaded = False
_opened: dict[str, ctypes.CDLL] = {}


def _cpu_id() -> Iterator[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                yield line
    except OSError:
        yield platform.processor()


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def choose_variant() -> tuple[str | None, str | None]:
    """(variant, None) for the build this CPU runs ($QVL_CPU_ISA, else its flags), or (None, why not)."""
    forced = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if forced != "auto" and forced not in VARIANTS:
        return None, f"{ISA_ENV}={forced!r} is not one of auto, {', '.join(VARIANTS)}"
    names = list(VARIANTS) if forced == "auto" else [forced]
    flags = _cpu_flags()
    if flags is None:  # no cpuinfo: try the first, its qvl_isa() tells whether it runs here
        return names[0], None
    for name in names:
        if set(VARIANTS[name][2]) <= flags:
            return name, None
    if forced == "auto":
        return None, "this CPU has neither AVX-512 (F, BW) + F16C nor AVX2 + FMA"
    lacks = sorted(set(VARIANTS[forced][2]) - flags)
    return None, f"{ISA_ENV}={forced} but this CPU lacks {', '.join(lacks)}"


def _cache_dir() -> Path:
    return Path(os.environ.get("QVL_KERNEL_CACHE") or Path.home() / ".cache" / "qvl" / "kernels")


def _build(variant: str, extra_flags: tuple[str, ...] = ()) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc / gcc / $CC) to build it")
    flags = ["-O3", *VARIANTS[variant][1], *extra_flags, "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [src.read_text() for src in SOURCES]
    key = hashlib.sha256("\n".join([variant, *texts, cc, version, *flags, platform.machine(),
                                    *sorted(set(_cpu_id()))]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"qgemv-{variant}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        log.info("building qvl's %s CPU kernel with %s (once, cached in %s)", variant, cc, out.parent)
        r = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def open_variant(variant: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The built, self-checked library of one variant (built on first use), whatever the CPU's
    flags say; RuntimeError saying why it cannot run here. The linears use the one
    :func:`choose_variant` picks; tests open each (``extra_flags``, e.g. ``-mno-avx512vnni``, build
    the code paths of CPUs with fewer features)."""
    key = " ".join((variant, *extra_flags))
    if key in _opened:
        return _opened[key]
    try:
        lib = ctypes.CDLL(str(_build(variant, extra_flags)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"qvl's {variant} CPU kernel could not be built: {e}") from e
    if lib.qvl_isa() != VARIANTS[variant][0]:
        raise RuntimeError(f"qvl's {variant} CPU kernel did not compile its {variant} path "
                           f"(qvl_isa {lib.qvl_isa()}): this CPU or compiler lacks {', '.join(VARIANTS[variant][2])}")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.qvl_qgemm.argtypes = [i, p, i, i, i, p, p, p, i, i, p, p, i, i]
    lib.qvl_dequant.argtypes = [i, p, p, p, i, i, i, p, i, i]
    lib.qvl_a8_gemm.argtypes = [i, p, i, i, i, p, p, p, i, i, i, p, p, i, i]
    lib.qvl_a8_dequant_t.argtypes = [i, p, p, p, i, i, i, p, i, i]
    lib.qvl_a8_quantize.argtypes = [p, i, i, i, i, p, p, p]
    f, l = ctypes.c_float, ctypes.c_long
    lib.qvl_rms_norm.argtypes = [p, p, p, p, i, i, i, f, p]
    lib.qvl_silu_mul.argtypes = [p, p, l, i, i, i, p, i]
    lib.qvl_decode_attention.argtypes = [p, p, p, l, i, i, i, i, i, p, p, p, p, p, p, i, i, p, p, i, f, p, i]
    lib.qvl_decode_layers.argtypes = [p, i, p, p, p, p]
    lib.qvl_decode_layers_work.argtypes = [p, i, i, i, i, i, i, i]
    lib.qvl_decode_layers_work.restype = ctypes.c_size_t
    err = _self_check(lib) or _self_check_a8(lib)
    if err:
        raise RuntimeError(f"qvl's {variant} CPU kernel {err}")
    _opened[key] = lib
    return lib


def _load() -> None:
    global _lib, _isa, _reason, _loaded
    _loaded = True
    if os.environ.get("QVL_CPU_KERNEL", "1") == "0":
        _reason = "disabled by QVL_CPU_KERNEL=0"
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"no qvl CPU kernel for {platform.machine()}"
        return
    variant, _reason = choose_variant()
    if variant is None:
        return
    try:
        _lib, _isa = open_variant(variant), variant
    except RuntimeError as e:
        _reason = str(e)
        log.warning("%s; quantized linears use torch's kernels", _reason)


def isa() -> str | None:
    """The variant the linears run ("avx512" or "avx2"), or None where none can (builds on first call)."""
    if not _loaded:
        _load()
    return _isa


def library() -> ctypes.CDLL | None:
    """The loaded library (builds it on the first call), or None where it cannot run (see :func:`unavailable`)."""
    if not _loaded:
        _load()
    return _lib


def unavailable() -> str | None:
    """Why the kernel cannot run here, or None when it can (builds it on the first call)."""
    if not _loaded:
        _load()
    return _reason


def unsupported_reason(bits: int, n: int, k: int, group: int, zeros: torch.Tensor, scales: torch.Tensor) -> str | None:
    """Why a layer cannot use the kernel (shapes, or values its layout cannot hold)."""
    block = 64 if bits == 4 else 32
    if n % 4 or group % block or k % group:
        return f"shape [{n}, {k}] / group {group} (needs N % 4, group % {block}, K % group)"
    if int(zeros.min()) < 0 or int(zeros.max()) > 255:
        return "zero points outside 0..255"
    if not torch.equal(scales.float().half().float(), scales.float()):
        return "scales that are not fp16 values"
    return unavailable()


ROWS = 4  # rows a block of the layout interleaves (qgemv.c's ROWS)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, K] codes -> the kernel's weight bytes [N/4, K-blocks, 4, 32] (see qgemv.c)."""
    q = q.to(torch.uint8)
    n, k = q.shape
    if bits == 4:
        blocks = q.reshape(n, k // 64, 2, 32)  # per 64 columns: [0..31] low nibbles, [32..63] high
        chunks = blocks[:, :, 0] | (blocks[:, :, 1] << 4)  # [N, K/64, 32]
    else:
        chunks = q.reshape(n, k // 32, 32)
    return chunks.reshape(n // ROWS, ROWS, -1, 32).transpose(1, 2).contiguous()


def unpack(w: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: [N, K] codes."""
    n = w.shape[0] * ROWS
    chunks = w.transpose(1, 2).reshape(n, -1, 32)
    if bits == 8:
        return chunks.reshape(n, k)
    return torch.stack([chunks & 0xF, chunks >> 4], dim=2).reshape(n, k)


def params(zeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, N] true zero points and scales -> the kernel's [N/4, G, 4] uint8 zeros and fp16 scales."""
    def interleave(t):
        g, n = t.shape
        return t.t().reshape(n // ROWS, ROWS, g).transpose(1, 2).contiguous()

    return interleave(zeros.to(torch.uint8)), interleave(scales.to(torch.float16))


def unparams(zeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`params`: [G, N] int16 zeros and float32 scales."""
    def deinterleave(t):
        nb, g, rows = t.shape
        return t.transpose(1, 2).reshape(nb * rows, g).t()

    return deinterleave(zeros).to(torch.int16), deinterleave(scales).to(torch.float32)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def qgemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
          bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] (fp32 or bf16, contiguous) @ W.T (+ bias fp32) -> [M, N] in x's dtype; ``lib``: a
    variant from :func:`open_variant` instead of the loaded one."""
    m, k = x.shape
    n = w.shape[0] * ROWS
    y = torch.empty(m, n, dtype=x.dtype)
    rc = (lib or _lib).qvl_qgemm(bits, x.data_ptr(), x.dtype == torch.bfloat16, m, k, w.data_ptr(),
                                 scales.data_ptr(), zeros.data_ptr(), n, group, _ptr(bias), y.data_ptr(),
                                 y.dtype == torch.bfloat16, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qvl_qgemm failed ({rc}) on x {list(x.shape)}, W [{n}, {k}], group {group}")
    return y


def dequantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, k: int, group: int,
               dtype: torch.dtype, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The dense W [N, K] in ``dtype`` (fp32, or bf16 rounded once from fp32)."""
    n = w.shape[0] * ROWS
    out = torch.empty(n, k, dtype=dtype)
    rc = (lib or _lib).qvl_dequant(bits, w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, k, group,
                                   out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qvl_dequant failed ({rc}) on W [{n}, {k}], group {group}")
    return out


# -- 8-bit activations (quant_kernel "qvl-a8"; qgemv.c's qvl_a8_*) -------------------------

A8_NT = 64  # outputs per tile of the a8 layout (qgemv.c's A8_NT); N is padded to a multiple
A8_BLOCK = 32  # columns of x per int8 scale (llama.cpp's Q8_0 block), or the largest that divides the group
# rows of x up to which the a8 kernel runs; more (long prefills) dequantize for torch's GEMM
A8_MAX_M = 64


def a8_block(group: int) -> int | None:
    """Columns per activation scale for weights in groups of ``group``: A8_BLOCK where it divides
    the group, else the largest multiple of 32 below it that does; None where none does."""
    return next((b for b in range(A8_BLOCK, 31, -32) if group % b == 0), None)


def a8_unsupported_reason(bits: int, n: int, k: int, group: int, zeros: torch.Tensor,
                          scales: torch.Tensor) -> str | None:
    """Why a layer cannot use the a8 kernel (shapes, or values its layout cannot hold)."""
    if a8_block(group) is None or k % group:
        return f"shape [{n}, {k}] / group {group} (needs group % 32, K % group)"
    if int(zeros.min()) < 0 or int(zeros.max()) > 2**bits - 1:
        return f"zero points outside 0..{2**bits - 1}"
    if not torch.equal(scales.float().half().float(), scales.float()):
        return "scales that are not fp16 values"
    return unavailable()


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0]
    pad = -n % A8_NT
    return t if not pad else torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def pack_a8(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, K] codes -> the a8 layout [ceil(N/64), K/KV, 4, 16, 4] (see qgemv.c), N padded with 0."""
    q = _pad_rows(q.to(torch.uint8))
    t, k = q.shape[0] // A8_NT, q.shape[1]
    if bits == 4:  # [tile, vector, lane, k-step, nibble, byte]: byte j = columns j (low) and j + 4 (high)
        qq = q.reshape(t, 4, 16, k // 8, 2, 4)
        qq = qq[:, :, :, :, 0] | (qq[:, :, :, :, 1] << 4)
    else:
        qq = q.reshape(t, 4, 16, k // 4, 4)
    return qq.permute(0, 3, 1, 2, 4).contiguous()


def unpack_a8(w: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_a8`: [N, K] codes."""
    t, steps = w.shape[:2]
    lanes = w.permute(0, 2, 3, 1, 4)  # [tile, vector, lane, k-step, byte]
    if bits == 4:
        lanes = torch.stack([lanes & 0xF, lanes >> 4], dim=4)  # [..., k-step, nibble, byte]
    return lanes.reshape(t * A8_NT, -1)[:n]


def params_a8(zeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, N] true zero points and scales -> the a8 layout's [ceil(N/64), G, 64] uint8 zeros and fp16 scales."""
    def tiles(t):
        t = _pad_rows(t.t())  # [Np, G]
        return t.reshape(-1, A8_NT, t.shape[1]).transpose(1, 2).contiguous()

    return tiles(zeros.to(torch.uint8)), tiles(scales.to(torch.float16))


def unparams_a8(zeros: torch.Tensor, scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`params_a8`: [G, N] int16 zeros and float32 scales."""
    def untile(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1])[:n].t()

    return untile(zeros).to(torch.int16), untile(scales).to(torch.float32)


def a8_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
            n: int, bias: torch.Tensor | None = None, ablock: int | None = None,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] (fp32 or bf16, contiguous), rounded to int8 per ``ablock`` columns (default
    :func:`a8_block`), @ W.T (+ bias fp32) -> [M, n] in x's dtype; W in the a8 layout."""
    m, k = x.shape
    ablock = ablock or a8_block(group)
    y = torch.empty(m, n, dtype=x.dtype)
    rc = (lib or _lib).qvl_a8_gemm(bits, x.data_ptr(), x.dtype == torch.bfloat16, m, k, w.data_ptr(),
                                   scales.data_ptr(), zeros.data_ptr(), n, group, ablock, _ptr(bias), y.data_ptr(),
                                   y.dtype == torch.bfloat16, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qvl_a8_gemm failed ({rc}) on x {list(x.shape)}, W [{n}, {k}], group {group}, "
                           f"block {ablock}")
    return y


def a8_dequantize_t(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, n: int, k: int,
                    group: int, dtype: torch.dtype, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The dense W.T [K, N] of the a8 layout in ``dtype`` (fp32, or bf16 rounded once from fp32)."""
    out = torch.empty(k, n, dtype=dtype)
    rc = (lib or _lib).qvl_a8_dequant_t(bits, w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, k, group,
                                        out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qvl_a8_dequant_t failed ({rc}) on W [{n}, {k}], group {group}")
    return out


def a8_quantize(x: torch.Tensor, ablock: int, lib: ctypes.CDLL | None = None):
    """What qvl_a8_gemm rounds x [M, K] to: int8 codes [M, K], scales float32 and sums int32 [M, K/ablock]."""
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    sx = torch.empty(m, k // ablock, dtype=torch.float32)
    sq = torch.empty(m, k // ablock, dtype=torch.int32)
    rc = (lib or _lib).qvl_a8_quantize(x.data_ptr(), x.dtype == torch.bfloat16, m, k, ablock, xq.data_ptr(),
                                       sx.data_ptr(), sq.data_ptr())
    if rc:
        raise RuntimeError(f"qvl_a8_quantize failed ({rc}) on x {list(x.shape)}, block {ablock}")
    return xq, sx, sq


def _self_check_a8(lib: ctypes.CDLL) -> str | None:
    """The a8 entry points against the formula on x rounded the same way, in float64."""
    g = torch.Generator().manual_seed(1)
    n, k, group, ablock = 72, 256, 128, 64
    for bits in (4, 8):
        q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 1 << bits, (k // group, n), generator=g)
        scales = (torch.rand(k // group, n, generator=g) * 0.01 + 1e-3).half().float()
        ref_w = (q.double() - zeros.repeat_interleave(group, 0).t()) * scales.repeat_interleave(group, 0).t()
        z, s = params_a8(zeros, scales)
        wp = pack_a8(q, bits)
        x = torch.randn(5, k, generator=g)
        try:
            xq, sx, _ = a8_quantize(x, ablock, lib=lib)
            y = a8_gemm(x, wp, s, z, bits, group, n, ablock=ablock, lib=lib)
            d = a8_dequantize_t(wp, s, z, bits, n, k, group, torch.float32, lib=lib)
        except RuntimeError as e:
            return f"failed its 8-bit-activation self-check: {e}"
        xr = (xq.double().reshape(5, -1, ablock) * sx.double()[..., None]).reshape(5, k)
        ref = xr @ ref_w.t()
        if (not torch.equal(d.double(), ref_w.t()) or (y.double() - ref).abs().max() > 1e-5 * ref.abs().max()
                or (xr - x.double()).abs().max() > x.abs().max() / 127):
            return f"({bits}-bit) disagrees with the 8-bit-activation formula in its self-check"
    return None


def _self_check(lib: ctypes.CDLL) -> str | None:
    """The built library against the plain formula, both widths, both activation dtypes."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 8, 128, 64
    for bits in (4, 8):
        q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 1 << bits, (k // group, n), generator=g)
        scales = (torch.rand(k // group, n, generator=g) * 0.01 + 1e-3).half().float()
        ref_w = (q.float() - zeros.repeat_interleave(group, 0).t()) * scales.repeat_interleave(group, 0).t()
        z, s = params(zeros, scales)
        wp = pack(q, bits)
        x = torch.randn(3, k, generator=g)
        bias = torch.randn(n, generator=g)
        xb = x.bfloat16()
        try:
            y = qgemm(x, wp, s, z, bits, group, bias, lib=lib)
            yb = qgemm(xb, wp, s, z, bits, group, bias, lib=lib).float()
            d = dequantize(wp, s, z, bits, k, group, torch.float32, lib=lib)
        except RuntimeError as e:
            return f"failed its self-check: {e}"
        ref = x @ ref_w.t() + bias
        ref_b = xb.float() @ ref_w.t() + bias
        if (not torch.equal(d, ref_w) or (y - ref).abs().max() > 1e-4 * ref.abs().max()
                or (yb - ref_b).abs().max() > 2**-7 * ref_b.abs().max()):
            return f"({bits}-bit) disagrees with the plain formula in its self-check"
    return None
