"""AWQ (Lin et al., 2023, arXiv:2306.00978): protect the weight columns that see large
activations by scaling them up before quantization and folding the inverse scale into the op
that produces their input, then clip each group's range where that lowers the output error.

Written from the paper and AutoAWQ's documented search (the defaults its Qwen2 recipe uses):
* scale search per group of linears sharing one input: ``s = x_mean^a / w_mean^(1-a)``
  normalised, ``a`` on a 20-point grid in [0, 1), choosing the ``a`` whose quantized
  ``module`` output is closest (MSE) to the float output. ``x_mean``: mean |x| per input
  channel; ``w_mean``: mean over output rows of |w| / max|w| of its group.
* the inverse scale is folded into the previous op: an RMSNorm's weight, or the rows of the
  previous linear (v -> o when shapes allow, up -> down).
* clip search per linear (not q/k, whose errors softmax amplifies): shrink each group's max|w|
  by up to 50% on a 20-point grid, keeping the value with the lowest per-group output error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qvl.quant.rtn import Grid, fake_quantize

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512  # tokens the clip search looks at (AutoAWQ samples the same number)
CLIP_ROWS = 256  # output rows per batch in the clip search, to bound its temporaries


def _w_mean(linears: list[nn.Linear], group: int) -> torch.Tensor:
    w = torch.cat([m.weight.float() for m in linears])  # [sum N, K]
    n, k = w.shape
    wg = w.abs().reshape(n, k // group, group)
    wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
    return wg.reshape(n, k).mean(0)


@torch.no_grad()
def search_scale(linears: list[nn.Linear], x: torch.Tensor, run: Callable[[], torch.Tensor], grid: Grid) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scales [K] for ``linears`` (all fed ``x`` [tokens, K]).

    ``run()`` evaluates the inspected module on the calibration input with the linears' current
    weights; the weights are modified in place during the search and restored afterwards.
    Returns (scales, relative error of the best point), scales of 1 if no scaling helps.
    """
    k = x.shape[-1]
    group = grid.group_for(k)
    x_mean = x.abs().reshape(-1, k).float().mean(0)
    w_mean = _w_mean(linears, group)
    originals = [m.weight.data.clone() for m in linears]
    reference = run().float()
    denom = float(reference.pow(2).mean()) or 1.0
    best, best_err = torch.ones(k, device=x.device), float("inf")
    try:
        for i in range(N_GRID):
            a = i / N_GRID
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for m, w in zip(linears, originals):
                m.weight.data = (fake_quantize(w.float() * s, grid) / s).to(w.dtype)
            err = float((run().float() - reference).pow(2).mean())
            if err < best_err:
                best_err, best = err, s.clone()
    finally:
        for m, w in zip(linears, originals):
            m.weight.data = w
    return best, best_err / denom


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``1/s`` into ``prev``'s output channels and ``s`` into the linears' input columns:
    the float function is unchanged, the quantized one protects large-``s`` columns."""
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
    else:  # RMSNorm: y = weight * normalized(x)
        prev.weight.data = (prev.weight.float() / s).to(prev.weight.dtype)
    for m in linears:
        m.weight.data = (m.weight.float() * s).to(m.weight.dtype)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per-group clip bounds [N, K/G] for w [N, K] with inputs x [tokens, K]."""
    n, k = w.shape
    group = grid.group_for(k)
    x = x.reshape(-1, k).float()
    if x.shape[0] > CLIP_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS, device=x.device).long()]
    xg = x.reshape(x.shape[0], k // group, group)  # [T, nG, G]
    out = []
    for r0 in range(0, n, CLIP_ROWS):
        wg = w[r0:r0 + CLIP_ROWS].float().reshape(-1, k // group, group)  # [n, nG, G]
        ref = torch.einsum("tgc,ngc->ngt", xg, wg)  # per-group partial outputs
        org_max = wg.abs().amax(-1)  # [n, nG]
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(MAX_SHRINK * N_GRID)):
            mx = org_max * (1 - i / N_GRID)
            wc = torch.maximum(torch.minimum(wg, mx[..., None]), -mx[..., None])
            scale, zero = grid.params(wc)
            q = grid.fake(wc, scale[..., None], zero[..., None])
            err = (torch.einsum("tgc,ngc->ngt", xg, q) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, mx, best_max)
        out.append(best_max)
    return torch.cat(out)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor, grid: Grid) -> None:
    n, k = linear.weight.shape
    group = grid.group_for(k)
    w = linear.weight.float().reshape(n, k // group, group)
    w = torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
    linear.weight.data = w.reshape(n, k).to(linear.weight.dtype)
