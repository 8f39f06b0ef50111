"""Static KV cache: one preallocated buffer pair per layer, written by position.

Shapes never change after allocation, so a decode step that writes one position and attends
over the whole buffer with a mask can be captured (CUDA graphs / torch.compile).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int = 0):
        """Write k, v [B, H, T, D] into cache rows ``row .. row+B-1``; return those rows' full buffers.

        ``input_pos`` [T]: the same positions in every row (a prefill chunk); [B, 1] with T = 1:
        one position per row (a decode step over slots at different lengths).
        """
        bsz = k.shape[0]
        kb, vb = self.k[row : row + bsz], self.v[row : row + bsz]
        if input_pos.dim() == 2:
            rows = torch.arange(bsz, device=k.device)
            kb[rows, :, input_pos[:, 0]] = k[:, :, 0]  # advanced indices around a slice: [B, H, D]
            vb[rows, :, input_pos[:, 0]] = v[:, :, 0]
        else:
            kb.index_copy_(2, input_pos, k)
            vb.index_copy_(2, input_pos, v)
        return kb, vb

    @staticmethod
    def bytes_for(max_batch, kv_heads, max_seq, head_dim, layers, dtype) -> int:
        return 2 * layers * max_batch * kv_heads * max_seq * head_dim * torch.empty((), dtype=dtype).element_size()
