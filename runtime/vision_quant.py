"""An 8-bit vision tower, made at load: every ``nn.Linear`` of the tower becomes an ``Int8Linear``.

On the 2B shapes the tower's linears are ~0.6 G weights, 1.3 GB in bf16 of a ~3 GB peak;
``vision_quant="int8"`` holds them as int8 codes with one fp16 scale per output channel
(symmetric, ``s = max|w| / 127``, codes -127..127 stored around a zero point of 128), about half
the bytes. What stays in float, and why: the patch embedding (a Conv3d, 1.5 M weights), the
LayerNorms and the biases (small, and the embedding sees raw pixels), and the rotary tables
(computed). The swap is done from outside the tower's module, on whatever ``nn.Linear`` it holds,
so a tower variant (Qwen2.5-VL's) needs nothing here.

A forward of many rows (the tower runs hundreds to thousands of patches a call) dequantizes the
layer's weight to the activation dtype and runs torch's dense GEMM, a block of output channels at a
time (:class:`VisionInt8Linear`, at most ``DEQUANT_BLOCK_BYTES`` of float weight alive): the
merger's 5120 x 5120 would be 52 MB in bf16 whole, more than the rest of the call. Up to
``qvl.quant.cpu.GEMV_MAX_M`` rows run qvl's int8 GEMV. On
the CPU torch's ``_weight_int8pack_mm`` was 5-7x slower than that at 1024 rows in bf16 and
~100x in fp32 (figures: bench/results/int8_memory.md).

At load (:class:`VisionQuantizer`), a vision linear's weight is read from the memory-mapped file,
rounded and its file pages dropped before the next one is read, so the float tower never
exists as a whole; :func:`quantize_vision` swaps a tower already in memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qvl.quant import cpu
from qvl.quant.linear import Int8Linear, QuantLinear
from qvl.quant.weight import dequantize as dequantize_weight
from qvl.quant.weight import QuantizedWeight
from qvl.runtime.footprint import DEQUANT_BLOCK_BYTES
from qvl.runtime.quantized import _return_freed_memory
from qvl.runtime.weights import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

VISION_QUANTS = ("none", "int8")
_SCALE_MIN = 2.0**-14  # fp16's smallest normal: scales stay in the range the kernels hold exactly
_ROWS_AT_ONCE = 1024  # rows rounded per step: one fp32 copy of a block, 21 MB on a 5120-wide merger


def check_vision_quant(scheme: str) -> None:
    if scheme not in VISION_QUANTS:
        raise ValueError(f"vision_quant {scheme!r}: use 'none' (the checkpoint's float tower) or 'int8'")


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Per-output-channel symmetric int8 codes of ``weight`` [N, K]: ``s = max|w| / 127`` rounded to
    fp16, ``q = round(w / s) + 128`` in 1..255 (zero point 128), so ``|w - s * (q - 128)| <= s / 2``
    for every weight (no code clips); a block of rows at a time."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, dtype=torch.float16, device=weight.device)
    for i in range(0, n, _ROWS_AT_ONCE):
        w = weight[i : i + _ROWS_AT_ONCE].to(torch.float32, copy=True)  # rounded in place below
        s = (w.abs().amax(1) / 127).clamp_(min=_SCALE_MIN).half()  # an all-zero row: any scale is exact
        q[i : i + _ROWS_AT_ONCE] = w.div_(s.float()[:, None]).round_().add_(128)
        scales[i : i + _ROWS_AT_ONCE] = s
    zeros = torch.full((1, n), 128, dtype=torch.int16, device=weight.device)
    return QuantizedWeight(q, zeros, scales[None], 8, k)


def block_rows(out_features: int, in_features: int, element_size: int) -> int:
    """Output channels dequantized at once: ``DEQUANT_BLOCK_BYTES`` of float weight, a whole number of
    the qvl layout's row blocks (``cpu.ROWS``), at least one."""
    rows = DEQUANT_BLOCK_BYTES // (in_features * element_size)
    return min(out_features, max(cpu.ROWS, rows - rows % cpu.ROWS))


class VisionInt8Linear(Int8Linear):
    """An ``Int8Linear`` whose many-row forward dequantizes a block of output channels at a time
    (:func:`block_rows`) into one preallocated output, so the transient is one block of float weight,
    not the layer's. In fp32 the result equals the whole-weight computation bit for bit; in bf16 it
    is within one bf16 rounding of the largest output, since oneDNN's bf16 GEMM sums K in an order
    that depends on N (tests/test_int8_memory.py checks both)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        m = x2.shape[0]
        rows = block_rows(self.out_features, self.in_features, x.element_size())
        blocked = (self.kernel == "dequant" or (self.kernel == "qvl" and m > cpu.GEMV_MAX_M)) and self.perm is None
        if not blocked or rows >= self.out_features:
            return super().forward(x)
        if self.kernel == "qvl":
            if x.dtype != self.act_dtype:
                raise TypeError(f"{type(self).__name__} was packed for {self.act_dtype} activations, got {x.dtype}")
            x2 = x2.contiguous()
        y = torch.empty(m, self.out_features, dtype=x.dtype, device=x.device)
        for a in range(0, self.out_features, rows):
            b = min(a + rows, self.out_features)
            w = self._weight_rows(a, b, x.dtype)  # [b - a, K]
            if self.bias is None:
                torch.mm(x2, w.t(), out=y[:, a:b])
            else:
                torch.addmm(self.bias[a:b].to(x.dtype), x2, w.t(), out=y[:, a:b])
            del w
        return y.reshape(*x.shape[:-1], self.out_features)

    def _weight_rows(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [a, b) of W [N, K] in ``dtype``, as the whole-weight forward rounds them."""
        if self.kernel == "qvl":  # the layout's blocks of cpu.ROWS rows; a and b are multiples (or b = N)
            blk = slice(a // cpu.ROWS, -(-b // cpu.ROWS))
            return cpu.dequantize(self.weight[blk], self.kscales[blk], self.kzeros[blk], self.bits,
                                  self.in_features, self.group_size, dtype)[: b - a]
        return dequantize_weight(self._load_q()[a:b], self.zeros[:, a:b], self.scales[:, a:b], self.g_idx,
                                 torch.float32).to(dtype)


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                kernel: str = "auto") -> QuantLinear:
    """The ``Int8Linear`` for one float linear's weight [N, K] and bias, run with ``dtype`` activations."""
    return VisionInt8Linear.from_weight(quantize_weight(weight), None if bias is None else bias.to(dtype), dtype, kernel)


def _linears(tower: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in tower.named_modules() if type(m) is nn.Linear}


def quantize_vision(tower: nn.Module, scheme: str = "int8", kernel: str = "auto") -> None:
    """Replace every ``nn.Linear`` of ``tower`` (in memory) by its int8 form, in place; "none": no change."""
    check_vision_quant(scheme)
    if scheme == "none":
        return
    for name, lin in _linears(tower).items():
        w = lin.weight.detach()
        tower.set_submodule(name, int8_linear(w, lin.bias, w.dtype, kernel))
    _return_freed_memory()


def linear_bytes(out_features: int, in_features: int, bias: bool) -> int:
    """Bytes an int8 vision linear holds in qvl's kernel layout: codes, an fp16 scale and a uint8
    zero per row, and the bias (fp32 there, whatever the activations). The dequant fallback (no
    qvl kernel here) holds an int16 zero and an int64 index per column instead (+8 K + N bytes)."""
    return out_features * (in_features + 2 + 1) + (4 * out_features if bias else 0)


def tower_bytes(tower: nn.Module, dtype: torch.dtype, scheme: str = "none") -> int:
    """Bytes of ``tower``'s parameters (built on the meta device is enough) once loaded in ``dtype``
    with ``vision_quant=scheme``; rotary tables and other computed buffers are left out."""
    check_vision_quant(scheme)
    size = torch.empty((), dtype=dtype).element_size()
    linears = _linears(tower) if scheme == "int8" else {}
    inside = {id(p) for m in linears.values() for p in m.parameters()}
    total = sum(p.numel() * size for p in tower.parameters() if id(p) not in inside)
    return total + sum(linear_bytes(m.out_features, m.in_features, m.bias is not None) for m in linears.values())


class VisionQuantizer:
    """The tower's linears that load as int8, and their file tensors (as ``QuantizedLinears`` for
    the decoder): ``claim`` takes their weights and biases while the loader reads names, ``build``
    rounds them one at a time from the mapped file and swaps the modules."""

    def __init__(self, model: nn.Module, scheme: str):
        check_vision_quant(scheme)
        self.scheme = scheme
        self.targets = {f"visual.{n}": m for n, m in _linears(model.visual).items()} if scheme == "int8" else {}
        self.found: dict[str, dict[str, str]] = {n: {} for n in self.targets}

    def claim(self, ours: str, file_name: str) -> bool:
        mod, _, leaf = ours.rpartition(".")
        if mod not in self.targets or leaf not in ("weight", "bias"):
            return False
        if leaf in self.found[mod]:
            raise CheckpointError(f"tensor {ours!r} given twice (under two naming schemes)")
        self.found[mod][leaf] = file_name
        return True

    def build(self, model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device, kernel: str = "auto") -> None:
        missing = [f"{mod}.{leaf}" for mod, lin in self.targets.items()
                   for leaf in ("weight",) + (("bias",) if lin.bias is not None else ()) if leaf not in self.found[mod]]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint lacks tensors {missing[:5]}{more}")
        before = after = 0
        kernels = set()
        for mod, lin in self.targets.items():
            names = self.found[mod]
            want = {"weight": (lin.out_features, lin.in_features), "bias": (lin.out_features,)}
            t = {}
            for leaf, name in names.items():
                if ckpt.shape(name) != want[leaf]:
                    raise CheckpointError(f"tensor {name!r} has shape {list(ckpt.shape(name))}, the config implies "
                                          f"{list(want[leaf])}")
                t[leaf] = ckpt.get(name).to(device)
            w = t["weight"]
            if w.dtype != dtype:  # round from the value the float tower would have used
                w = w.to(dtype)
            try:
                module = int8_linear(w, t.get("bias"), dtype, kernel)
            except ValueError as e:  # a kernel asked for by name that cannot run this layer
                raise ValueError(f"{mod}: {e}") from None
            model.set_submodule(mod, module)
            before += lin.weight.numel() * torch.empty((), dtype=dtype).element_size()
            after += module.nbytes()
            kernels.add(module.kernel)
            del t, w
            for name in names.values():
                ckpt.release(name)
        _return_freed_memory()
        if self.targets:
            log.info("vision tower: %d linears in int8 (%s kernel), %.0f MB instead of %.0f MB", len(self.targets),
                     "/".join(sorted(kernels)), after / 2**20, before / 2**20)
