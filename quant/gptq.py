"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): quantize a linear's weight column by column,
pushing each column's rounding error onto the columns not yet quantized through the inverse
Hessian of the layer's reconstruction loss, H = 2/n * sum(x x^T) over calibration inputs x.

Written from the paper's Algorithm 1 (lazy block updates, Cholesky form of H^-1), with the
knobs AutoGPTQ exposes and Qwen's releases record: ``damp_percent`` (added to the diagonal, as
a fraction of its mean), ``desc_act`` (act-order: columns in order of decreasing H diagonal,
groups then taken in that order and recorded in ``g_idx``), ``group_size``, ``sym``, 4/8 bits.
"""

from __future__ import annotations

import logging

import torch

from qvl.quant.rtn import Grid
from qvl.quant.weight import QuantizedWeight

log = logging.getLogger(__name__)


class Hessian:
    """Running H = 2/n * X^T X of one linear's inputs, accumulated batch by batch in fp32."""

    def __init__(self, in_features: int, device="cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)  # [tokens, K]
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.t(), x)


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, raising the damping until H is positive definite."""
    diag = torch.arange(h.shape[0], device=h.device)
    mean = float(h.diagonal().mean())
    damp = damp_percent
    for _ in range(6):
        hd = h.clone()
        hd[diag, diag] += damp * mean
        l, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                if damp != damp_percent:
                    log.warning("Hessian not positive definite at damp %.3g; used %.3g", damp_percent, damp)
                return u
        damp *= 10
    raise RuntimeError("Hessian is not positive definite even with heavy damping: are the calibration "
                       "inputs all zero or NaN?")


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, damp_percent: float = 0.1,
         desc_act: bool = False, block_size: int = 128) -> tuple[QuantizedWeight, dict]:
    """w [N, K] -> (QuantizedWeight, stats). ``hessian`` [K, K] from :class:`Hessian`.

    stats: ``loss`` = sum over columns of err^2 / [H^-1]_jj, the second-order estimate of the
    increase in reconstruction loss the paper minimises; ``damp`` used.
    """
    n, k = w.shape
    grid.check(k)
    g = grid.group_for(k)
    W = w.to(hessian.device, torch.float32).clone()
    H = hessian.clone()
    dead = H.diagonal() == 0  # inputs that were always zero: nothing to preserve there
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = None
    if desc_act:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp_percent)
    del H

    Q = torch.zeros_like(W)
    n_groups = k // g
    scales = torch.zeros(n, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                # group params from the updated weights of the group's columns, as the paper's
                # implementation does: columns further right already carry earlier errors
                gw = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scale, zero = grid.params(gw)
                scales[:, col // g], zeros[:, col // g] = scale, zero
            wc = W1[:, i]
            d = U1[i, i]
            qc = grid.quantize(wc, scale, zero)
            Q[:, col] = qc
            err = (wc - scale * (qc - zero)) / d
            loss += (err.double() ** 2).sum()
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        g_idx = (torch.arange(k, device=W.device) // g)[inv].to(torch.int32)
    qw = QuantizedWeight(Q.to(torch.uint8).cpu(), zeros.t().to(torch.int16).contiguous().cpu(),
                         scales.t().half().contiguous().cpu(), grid.bits, g,
                         g_idx.cpu() if g_idx is not None else None)
    return qw, {"loss": float(loss)}
