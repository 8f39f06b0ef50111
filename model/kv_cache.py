"""Static KV cache: one preallocated buffer pair per layer, written by position.

Shapes never change after allocation, so a decode step that writes one position and attends
over the whole buffer with a mask can be captured (CUDA graphs / torch.compile).

With ``dtype=torch.int8`` each (slot, head, position) row of ``head_dim`` values is stored as
int8 codes and one fp16 scale, symmetric: ``x ~= q * s`` with ``s = max|x| / 127`` and
``q = round(x / s)`` in -127..127 (llama.cpp's q8_0, with a block of one head's row instead of
32 values: 8.125 bits a value at head_dim 128 instead of 16). Rows are quantized as they are
written and dequantized to the query's dtype when attention reads them, so the bytes held stay
int8 and only the rows one attention call reads exist in float, for that call.
"""

from __future__ import annotations

import torch
from torch import nn

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype
QMAX = 127
# fp16 scales: below 2**-24 a scale is zero, above 65504 it overflows; clamp into the fp16 range
_SCALE_MIN, _SCALE_MAX = 2.0**-24, 65504.0


def check_kv_cache_dtype(name: str) -> torch.dtype | None:
    """The storage dtype of a ``kv_cache_dtype`` option (None: the model's), or ValueError."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r}: use 'auto' (the model dtype) or 'int8'")
    return torch.int8 if name == "int8" else None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 codes [..., D] and fp16 scales [..., 1], one scale per row of D values.

    The codes are rounded against the fp16 scale that is stored, so ``q * s`` is what is read back
    (|x - q * s| <= s / 2 for every value under the clamp).
    """
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / QMAX).clamp_(_SCALE_MIN, _SCALE_MAX).half()
    q = torch.round(xf / scale.float()).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] and scales [..., 1] -> values in ``dtype``: the product rounded once (the codes
    are exact in any float dtype, and a bf16 x fp16 product is computed in fp32), in two passes."""
    return q.to(dtype).mul_(scale)


class KVCache(nn.Module):
    def __init__(self, max_batch: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_batch, kv_heads, max_seq, head_dim)
        self.quantized = dtype == torch.int8
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        scale = None
        if self.quantized:  # [B, H, S, 1] fp16: one scale per written row
            scale = torch.zeros(shape[:-1] + (1,), dtype=torch.float16, device=device)
        self.register_buffer("k_scale", scale, persistent=False)
        self.register_buffer("v_scale", None if scale is None else scale.clone(), persistent=False)

    def tensors(self) -> list[torch.Tensor]:
        """Every per-position buffer, each [slots, kv_heads, max_seq, ...]: what a row copy must move."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int = 0,
               kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] into cache rows ``row .. row+B-1``; return those rows' first
        ``kv_len`` positions (default: all), in k's dtype.

        ``input_pos`` [T]: the same positions in every row (a prefill chunk); [B, 1] with T = 1:
        one position per row (a decode step over slots at different lengths). An int8 cache
        returns what it holds, dequantized, the chunk's own rows included, so every read of a
        position sees the same values whichever call wrote it.
        """
        bsz = k.shape[0]
        rows = slice(row, row + bsz)
        if self.quantized:
            (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
            pairs = ((self.k[rows], kq), (self.v[rows], vq), (self.k_scale[rows], ks), (self.v_scale[rows], vs))
        else:
            pairs = ((self.k[rows], k), (self.v[rows], v))
        for buf, new in pairs:
            if input_pos.dim() == 2:
                index = torch.arange(bsz, device=k.device)
                buf[index, :, input_pos[:, 0]] = new[:, :, 0]  # advanced indices around a slice: [B, H, D]
            else:
                buf.index_copy_(2, input_pos, new)
        n = self.k.shape[2] if kv_len is None else kv_len
        if not self.quantized:
            return self.k[rows, :, :n], self.v[rows, :, :n]
        return (dequantize_rows(self.k[rows, :, :n], self.k_scale[rows, :, :n], k.dtype),
                dequantize_rows(self.v[rows, :, :n], self.v_scale[rows, :, :n], v.dtype))

    @staticmethod
    def bytes_for(max_batch, kv_heads, max_seq, head_dim, layers, dtype) -> int:
        """Bytes of the caches of ``layers`` layers; ``dtype`` a float dtype, or torch.int8 / "int8"
        for codes plus one fp16 scale per (slot, head, position) row."""
        rows = 2 * layers * max_batch * kv_heads * max_seq  # k and v
        if dtype in (torch.int8, "int8"):
            return rows * (head_dim + 2)
        return rows * head_dim * torch.empty((), dtype=dtype).element_size()
