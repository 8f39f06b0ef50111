"""Group-wise integer grids and the round-to-nearest baseline every other scheme is judged against.

A group of ``group_size`` consecutive input columns of one output row shares a scale ``s`` and
an integer zero point ``z``: ``W ~ s * (q - z)``, ``q`` in ``[0, 2**bits - 1]``. Scales are
rounded to fp16 *before* the weights are rounded to the grid, so what lands in the file
dequantizes to exactly the values the algorithms optimised against.

Grids (the conventions of the formats' own quantizers):
* ``sym`` (GPTQ, Qwen's Int4/Int8 releases): ``z = 2**(bits-1)``, ``s = 2 * max|w| / maxq``.
* asym (AWQ, GPTQ ``sym=False``): ``s = (max - min) / maxq`` over the group's range,
  ``z = round(-min / s)``. GPTQ widens the range to include 0 (its ``Quantizer``); AWQ does not.
  ``min_zero`` is the smallest ``z`` kept: AutoGPTQ v1 files store ``z - 1``, so a GPTQ zero
  must be >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl.quant.weight import QuantizedWeight


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int = 128  # -1: the whole input dim is one group
    sym: bool = True
    include_zero: bool = True  # widen [min, max] to contain 0 (GPTQ); AWQ: False
    min_zero: int = 0  # smallest zero point the file format can hold (GPTQ v1: 1)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check(self, in_features: int) -> None:
        g = self.group_for(in_features)
        if in_features % g:
            raise ValueError(f"in_features={in_features} is not divisible by group_size={g}")

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w [..., G] float -> (scale [...] fp32 holding fp16 values, zero [...] fp32 integers)."""
        w = w.float()
        if self.sym:
            amax = w.abs().amax(-1)
            scale = (2 * amax / self.maxq)
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            lo, hi = w.amin(-1), w.amax(-1)
            if self.include_zero:
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = (hi - lo) / self.maxq
            zero = None
        # an all-zero group gets scale 1 (any scale is exact there); tiny ones keep fp16's normal range
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=2.0**-14).half().float()
        if zero is None:
            zero = (-lo / scale).round()
        return scale, zero.clamp(self.min_zero, self.maxq)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """w [..., G], scale/zero [...] or broadcastable -> integer codes (fp32) in [0, maxq]."""
        return (w.float() / scale + zero).round().clamp(0, self.maxq)

    def fake(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize: the weight the packed tensors will stand for."""
        return scale * (self.quantize(w, scale, zero) - zero)


def rtn(w: torch.Tensor, grid: Grid) -> QuantizedWeight:
    """Round-to-nearest with per-group params from the weights' own range. w [N, K]."""
    n, k = w.shape
    grid.check(k)
    g = grid.group_for(k)
    wg = w.float().reshape(n, k // g, g)
    scale, zero = grid.params(wg)  # [N, K/G]
    q = grid.quantize(wg, scale[..., None], zero[..., None]).reshape(n, k)
    return QuantizedWeight(q.to(torch.uint8), zero.t().to(torch.int16).contiguous(),
                           scale.t().half().contiguous(), grid.bits, g)


def fake_quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """RTN quantize-dequantize of w [N, K] in fp32, without building a QuantizedWeight."""
    n, k = w.shape
    g = grid.group_for(k)
    wg = w.float().reshape(n, k // g, g)
    scale, zero = grid.params(wg)
    return grid.fake(wg, scale[..., None], zero[..., None]).reshape(n, k)
