"""The decoded form every checkpoint format is read into, and its reference dequantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """W[n, k] = scales[g(k), n] * (q[n, k] - zeros[g(k), n]), in nn.Linear orientation.

    ``g(k)`` is ``g_idx[k]`` when given (GPTQ act-order), else ``k // group_size``.
    """

    q: torch.Tensor  # uint8 [N, K], values in [0, 2**bits)
    zeros: torch.Tensor  # int16 [n_groups, N], true zero points
    scales: torch.Tensor  # float [n_groups, N] (fp16 in both formats)
    bits: int
    group_size: int  # input columns per group; K when one group spans the row
    g_idx: torch.Tensor | None = None  # int [K]

    def __post_init__(self):
        n, k = self.q.shape
        if self.zeros.shape != self.scales.shape or self.scales.shape[1:] != (n,):
            raise ValueError(f"zeros {tuple(self.zeros.shape)} / scales {tuple(self.scales.shape)} do not "
                             f"match q [N={n}, K={k}]")
        if self.g_idx is None and (k % self.group_size or k // self.group_size != self.scales.shape[0]):
            raise ValueError(f"K={k} in groups of {self.group_size} does not give {self.scales.shape[0]} groups")
        if self.g_idx is not None:
            if self.g_idx.shape != (k,):
                raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected [{k}]")
            if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[0]:
                raise ValueError(f"g_idx values must index the {self.scales.shape[0]} groups")

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def group_index(self) -> torch.Tensor:
        """int64 [K]: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.q.device) // self.group_size

    def contiguous_groups(self) -> tuple[torch.Tensor | None, bool]:
        """(perm, ok): ``q[:, perm]`` has groups of ``group_size`` consecutive columns in order.

        perm is None when the columns already are. ``ok`` is False when no permutation makes
        the groups uniform (a g_idx with unequal group sizes).
        """
        if self.g_idx is None:
            return None, True
        g = self.g_idx.long()
        perm = torch.argsort(g, stable=True)
        want = torch.arange(self.in_features, device=g.device) // self.group_size
        if not torch.equal(g[perm], want):
            return None, False
        if torch.equal(perm, torch.arange(self.in_features, device=g.device)):
            return None, True
        return perm, True

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """[N, K] in ``dtype``. In fp32 this is exact: (q - z) is a small integer and s an fp16."""
        return dequantize(self.q, self.zeros, self.scales, self.group_index(), dtype)


def dequantize(q, zeros, scales, group_index, dtype=torch.float32) -> torch.Tensor:
    """W[n, k] = scales[g[k], n] * (q[n, k] - zeros[g[k], n]) -> [N, K]; no host syncs."""
    z = zeros.t()[:, group_index].to(torch.float32)  # [N, K]
    s = scales.t()[:, group_index].to(torch.float32)
    return ((q.to(torch.float32) - z) * s).to(dtype)
