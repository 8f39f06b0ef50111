"""M-RoPE: 3D (temporal, height, width) rotary positions for the Qwen2 decoder.

Host-side bookkeeping (``rope_index``) runs once per prompt, as transformers'
``Qwen2VLModel.get_rope_index``: text tokens advance all three axes together; an image or
video block gets (t, row, col) ids offset by the running position, and text after it
resumes at ``offset + max(h, w) / merge``. Decode then needs only ``input_pos + rope_delta``.

Videos follow transformers 5.x, the reference here: the temporal id of frame pair k is
``offset + k`` and the text resumes at ``offset + max(h, w) / merge`` whatever t is, so for a
video with more frame pairs than that, the following text reuses temporal ids of the video.
The original Qwen2-VL code (transformers 4.x) resumed at ``offset + max(t, h/merge, w/merge)``.

Qwen2.5-VL ties video time to seconds: frame pair k gets ``offset + int(k * tokens_per_second *
second_per_grid_t)``, where ``second_per_grid_t`` = temporal_patch_size / sampled fps, so the
same frames sampled at another rate get other ids. The product is taken in float32 and truncated,
as the reference does (the processor hands it float32 tensors): in float64, 3 * (2 * (2/3)) falls
just under 4 and would truncate to 3. Images and Qwen2-VL videos advance by 1 per frame pair.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for the tables of :meth:`MRope.forward`, bit for bit: the
    sign of rotate_half's first half sits in ``sin_signed``, and (-a) * b == a * (-b) exactly."""
    return x * cos + swap_halves(x) * sin_signed


def rope_index(
    input_ids: torch.Tensor,
    grids: list[tuple[int, int, int]],
    vision_token_ids: tuple[int, ...],
    merge: int,
    attention_mask: torch.Tensor | None = None,
    seconds: list[float | None] | None = None,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids for a (left-padded) batch.

    input_ids [B, T]; ``grids`` lists (t, h, w) of every image/video in batch order (the
    order their pad-token runs appear); a run of consecutive ``vision_token_ids`` consumes
    one grid and must hold t*h*w/merge**2 tokens. Padding (mask 0) gets position 0.
    ``seconds`` (aligned with ``grids``): each video's seconds per frame pair, None for
    images; with ``tokens_per_second`` (Qwen2.5-VL) video time ids follow them, without it
    (Qwen2-VL) they are ignored.
    Returns positions [3, B, T] int64 and ``rope_delta`` [B] such that the position of the
    token at padded index i >= T is ``i + rope_delta`` on all three axes.
    """
    bsz, seqlen = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = torch.zeros(3, bsz, seqlen, dtype=torch.int64)
    deltas = torch.zeros(bsz, dtype=torch.int64)
    is_vis = torch.isin(input_ids, torch.tensor(vision_token_ids, dtype=input_ids.dtype))
    if seconds is not None and len(seconds) != len(grids):
        raise ValueError(f"{len(seconds)} seconds-per-grid values for {len(grids)} grids")
    grid_iter = iter(zip(grids, seconds if seconds is not None else [None] * len(grids)))
    for b in range(bsz):
        keep = attention_mask[b].bool()
        vis = is_vis[b][keep].tolist()
        ids = input_ids[b][keep].tolist()
        chunks, cur, i, n = [], 0, 0, len(vis)
        while i < n:
            j = i
            if vis[i]:
                # one run of identical pad tokens is one image / video
                while j < n and vis[j] and ids[j] == ids[i]:
                    j += 1
                try:
                    (t, h, w), sec = next(grid_iter)
                except StopIteration:
                    raise ValueError("more image/video placeholder runs in the prompt than grids") from None
                gh, gw = h // merge, w // merge
                if j - i != t * gh * gw:
                    raise ValueError(f"placeholder run of {j - i} tokens does not match grid {(t, h, w)} "
                                     f"({t * gh * gw} tokens)")
                tt = torch.arange(t)
                if sec is not None and tokens_per_second is not None:
                    step = torch.tensor(tokens_per_second, dtype=torch.float32) * torch.tensor(sec, dtype=torch.float32)
                    tt = (tt * step).long()
                tt = tt.view(t, 1, 1).expand(t, gh, gw)
                hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw)
                ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw)
                chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(gh, gw)
            else:
                while j < n and not vis[j]:
                    j += 1
                chunks.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
            i = j
        pos = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.int64)
        positions[:, b, keep] = pos
        deltas[b] = (int(pos.max()) + 1 if n else 0) - seqlen
    if next(grid_iter, None) is not None:
        raise ValueError("more image/video grids than placeholder runs in the prompt")
    return positions, deltas


class MRope(nn.Module):
    """Rotary tables cos, sin_signed [B, T, 1, head_dim] for M-RoPE ids [3, B, T], for
    :func:`apply_rotary` on q and k laid out [B, T, heads, head_dim].

    The rotary half-dim is split into ``mrope_section`` chunks (t, h, w); chunk k takes its
    angles from axis k. Text tokens have equal ids on every axis, which is plain 1D RoPE.
    ``sin_signed`` is sin with its first half negated (rotate_half's sign), built once a forward
    so that no layer pays for the negation.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...]):
        super().__init__()
        self.mrope_section = list(mrope_section)
        # computed on the CPU even inside a meta-device build: tiny, and math on meta tensors
        # imports torch._dynamo (~0.7 s of every model load)
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        # axis (0, 1, 2) feeding each frequency
        axis = torch.cat([torch.full((n,), i % 3, device="cpu") for i, n in enumerate(self.mrope_section)])
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # pick, for every frequency, the position on its axis: [3, B, T] -> [B, T, head_dim/2]
        pos = positions.permute(1, 2, 0).float()[..., self.axis]
        freqs = pos * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # [B, T, 1, head_dim]
        sin, half = emb.sin(), emb.shape[-1] // 2
        return emb.cos().to(dtype), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).to(dtype)
