"""Qwen2-VL vision tower: Conv3d patch embed, 2D rotary, block-diagonal attention, patch merger.

Pure math. Host-side bookkeeping (rotary ids, per-image sequence boundaries) comes from
``vision_positions(grid_thw)`` so an exporter can feed the same inputs to an ONNX graph.
Reference: transformers ``modeling_qwen2_vl.py`` (Qwen2VisionTransformerPretrainedModel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl.model.config import VisionConfig
from qvl.model.rope import rotate_half


def vision_positions(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (row, col) ids per patch and attention boundaries, from ``grid_thw`` [n, 3].

    Patches arrive in merge-block order (``merge x merge`` neighbours consecutive), so the ids
    are laid out the same way. Attention is restricted to one frame of one image/video:
    ``cu_seqlens`` holds cumulative patch counts of every (image, frame) pair.
    Returns ``pos_hw`` [n_patches, 2] int64 and ``cu_seqlens`` [n_frames_total + 1] int64.
    """
    pos, lens = [], []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: merge-block order
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        pos.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
        lens += [h * w] * t
    cu = F.pad(torch.tensor(lens, dtype=torch.int64).cumsum(0), (1, 0))
    return torch.cat(pos), cu


class VisionRotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        half = head_dim // 2  # rows rotate one half of the head, columns the other
        self.register_buffer(
            "inv_freq", 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32, device="cpu") / half),
            persistent=False,  # on the CPU even in a meta-device build (see MRope)
        )

    def forward(self, pos_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos_hw[..., None].float() * self.inv_freq  # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)  # [N, head_dim/2]: row freqs then col freqs
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, cu_seqlens: list[int] | None, mask: torch.Tensor | None = None):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, H, Dh] each
        # rotary in fp32 as the reference does; cos/sin [N, Dh] -> [N, 1, Dh]
        c, s = cos[:, None], sin[:, None]
        q = (q.float() * c + rotate_half(q.float()) * s).to(v.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(v.dtype)
        # [1, H, N, Dh]: with 4-D inputs torch's CPU SDPA takes its fused kernel; 3-D ones fall
        # back to the math path, 3-9x slower at vision sizes (torch 2.13)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif len(cu_seqlens) == 2:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # one frame per chunk: no [N, N] mask, memory stays linear in the number of frames
            out = torch.cat([
                F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])
            ], dim=2)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))  # [H, N, Dh] -> [N, H * Dh]


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = VisionMLP(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x, cos, sin, cu_seqlens, mask=None):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.width))  # [N, E] -> [N/4, 4E] -> [N/4, D]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)
        self.rotary = VisionRotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    def forward(self, pixel_values: torch.Tensor, pos_hw: torch.Tensor, cu_seqlens: list[int] | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] -> merged embeddings [N / merge**2, hidden_size].

        Attention stays inside one frame: eager callers give the frame boundaries ``cu_seqlens``
        (per-frame SDPA, memory linear in the frame count); a traced graph, where boundaries are
        data rather than Python ints, gives ``mask`` [N, N] instead (bool, True = attend, or additive).
        """
        c = self.cfg
        x = pixel_values.to(self.dtype).view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        # a Conv3d whose stride equals its kernel is one matmul over flattened patches
        w = self.patch_embed.weight.view(c.embed_dim, -1)
        x = x.flatten(1) @ w.t()  # [N, E]
        cos, sin = self.rotary(pos_hw)
        for blk in self.blocks:
            x = blk(x, cos, sin, cu_seqlens, mask)
        return self.merger(x)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        pos_hw, cu = vision_positions(grid_thw, self.cfg.spatial_merge_size)
        return self(pixel_values, pos_hw.to(pixel_values.device), cu.tolist())
