"""Qwen2-VL / Qwen2.5-VL vision tower: Conv3d patch embed, 2D rotary, block-diagonal attention,
patch merger.

Pure math. Host-side bookkeeping (rotary ids, per-image sequence boundaries, the window order)
comes from ``vision_positions(grid_thw)`` and ``window_index(grid_thw)``, so an exporter can feed
the same inputs to an ONNX graph.

The Qwen2.5-VL variant (``cfg.windowed``) differs in three places: RMSNorm and a gated SiLU MLP in
each block, an RMSNorm in the merger, and window attention. For the windows, merge blocks are
reordered window by window (``window_index``) before the first block; every block then attends
inside one window, except ``fullatt_block_indexes``, which attend inside one frame (a frame's
windows stay in its own patch range, so frame boundaries hold in either order); the merger's
output is put back in raster order.
References: transformers ``modeling_qwen2_vl.py`` (Qwen2VisionTransformerPretrainedModel),
``modeling_qwen2_5_vl.py`` (Qwen2_5_VisionTransformerPretrainedModel) and
``vision_utils.get_vision_window_index``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl.model.config import VisionConfig
from qvl.model.decoder import RMSNorm
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


def window_index(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of the merge blocks and the windows' boundaries, from ``grid_thw`` [n, 3].

    Each frame's ``h/merge x w/merge`` grid of merge blocks is cut into ``window x window``
    squares (smaller at the right and bottom edges), visited row-major, frame by frame.
    Returns ``index`` [n_patches / merge**2] int64 (the raster position of the block taking each
    place) and ``cu_windows`` [n_windows + 1] int64, cumulative patch counts of the windows.
    """
    index, lens, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        frame, frame_lens = [], []  # one frame's order; every frame of the grid has the same
        for r in range(0, gh, window):
            for c in range(0, gw, window):
                rows = torch.arange(r, min(r + window, gh))
                cols = torch.arange(c, min(c + window, gw))
                frame.append((rows[:, None] * gw + cols).reshape(-1))
                frame_lens.append(len(rows) * len(cols) * merge * merge)
        frames = torch.arange(t)[:, None] * (gh * gw) + offset  # [t, 1] first block of each frame
        index.append((torch.cat(frame)[None] + frames).reshape(-1))
        lens += frame_lens * t
        offset += t * gh * gw
    cu = F.pad(torch.tensor(lens, dtype=torch.int64).cumsum(0), (1, 0))
    return torch.cat(index), cu


def to_windows(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of ``x`` [N, ...] moved, ``unit`` consecutive rows (one merge block) at a time, into
    window order: block i of the result is block ``index[i]`` of ``x``."""
    return x.view(-1, unit, *x.shape[1:])[index].flatten(0, 1)  # [N/u, u, ...] -> [N, ...]


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
        q, k = vision_rotary(q, c, s), vision_rotary(k, c, s)
        # [1, H, N, Dh]: with 4-D inputs torch's CPU SDPA takes its fused kernel; 3-D ones fall
        # back to the math path, 3-9x slower at vision sizes (torch 2.13)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0]
        elif len(cu_seqlens) == 2:
            out = F.scaled_dot_product_attention(q, k, v)[0]
        else:
            out = segment_attention(q[0], k[0], v[0], cu_seqlens)
        return self.proj(out.transpose(0, 1).reshape(n, -1))  # [H, N, Dh] -> [N, H * Dh]


# bytes of one fp32 [rows, E] rotary temporary per chunk of patches: over a whole call the fp32
# copies of q (or k), its rotation and their products are the attention's largest transients
ROTARY_CHUNK_BYTES = 4 << 20


def vision_rotary(t: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(t * c + rotate_half(t) * s)`` in fp32, back in ``t``'s dtype: t [N, H, Dh], c and s
    [N, 1, Dh]. Patches are independent, so they rotate a chunk at a time into one output, the
    same bits as one pass (a traced graph keeps the one pass: a Python loop would fix N in it)."""
    n, width = t.shape[0], t.shape[1] * t.shape[2]
    rows = max(64, ROTARY_CHUNK_BYTES // (width * 4))
    if n <= rows or torch.jit.is_tracing() or torch.compiler.is_compiling():
        f = t.float()
        return (f * c + rotate_half(f) * s).to(t.dtype)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    for a in range(0, n, rows):
        f = t[a : a + rows].float()
        out[a : a + rows] = f * c[a : a + rows] + rotate_half(f) * s[a : a + rows]
    return out


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Attention inside each patch range [cu[i], cu[i+1]) of q, k, v [H, N, Dh] -> [H, N, Dh].

    No [N, N] mask: memory stays linear in the number of segments. Segments of one length (a
    video's frames, a picture's full windows) run as one batched call [n, H, L, Dh]; one call per
    segment would cost a dispatch per 64-patch window, dozens per block at 1000 px.
    """
    heads, _, dh = q.shape
    by_len: dict[int, list[int]] = {}
    for a, b in zip(cu[:-1], cu[1:]):
        by_len.setdefault(b - a, []).append(a)
    out = torch.empty_like(q) if len(by_len) > 1 else None
    for length, starts in by_len.items():
        n = len(starts)
        if out is None:  # every segment this long, back to back: a view, no copies
            qs, ks, vs = (t.view(heads, n, length, dh).transpose(0, 1) for t in (q, k, v))
            return F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).reshape(heads, -1, dh)
        if n == 1:
            a = starts[0]
            out[:, a:a + length] = F.scaled_dot_product_attention(q[None, :, a:a + length], k[None, :, a:a + length],
                                                                  v[None, :, a:a + length])[0]
            continue
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).view(-1)
        # [H, n*L, Dh] -> [n, H, L, Dh]
        qs, ks, vs = (t[:, idx].view(heads, n, length, dh).transpose(0, 1) for t in (q, k, v))
        out[:, idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).reshape(heads, -1, dh)
    return out


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL's block MLP: down(silu(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: VisionConfig) -> nn.Module:
    return RMSNorm(cfg.embed_dim, 1e-6) if cfg.windowed else nn.LayerNorm(cfg.embed_dim, eps=1e-6)


# bytes of one [rows, hidden] MLP activation per chunk of patches: the MLP's [N, 4E] temporaries
# (three alive at once) were the largest part of a block's peak
MLP_CHUNK_BYTES = 4 << 20


def mlp_chunk_rows(hidden: int, element_size: int) -> int:
    return max(64, MLP_CHUNK_BYTES // (hidden * element_size))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.norm2 = _norm(cfg)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        if cfg.windowed:
            self.hidden = cfg.intermediate_size
            self.mlp = VisionGatedMLP(cfg.embed_dim, cfg.intermediate_size)
        else:
            self.hidden = int(cfg.embed_dim * cfg.mlp_ratio)
            self.mlp = VisionMLP(cfg.embed_dim, self.hidden)

    def forward(self, x, cos, sin, cu_seqlens, mask=None):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, mask)
        rows = mlp_chunk_rows(self.hidden, x.element_size())
        n = x.shape[0]
        # a traced graph (ONNX export) keeps the plain path: a Python loop over N would fix N in it
        if n <= rows or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return x + self.mlp(self.norm2(x))
        # rows are independent (norm, MLP and residual are per patch): [rows, hidden] at a time
        out = torch.empty_like(x)
        for a in range(0, n, rows):
            xa = x[a : a + rows]
            out[a : a + rows] = xa + self.mlp(self.norm2(xa))
        return out


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = _norm(cfg)
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
                mask: torch.Tensor | None = None, windows: torch.Tensor | None = None,
                cu_windows: list[int] | None = None, window_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] -> merged embeddings [N / merge**2, hidden_size].

        Attention stays inside one frame: eager callers give the frame boundaries ``cu_seqlens``
        (per-frame SDPA, memory linear in the frame count); a traced graph, where boundaries are
        data rather than Python ints, gives ``mask`` [N, N] instead (bool, True = attend, or additive).
        The windowed variant also takes ``windows`` (``window_index``) and, in the same two forms,
        the window boundaries ``cu_windows`` or ``window_mask``; boundaries and masks are in
        window order, as the blocks see the patches.
        """
        c = self.cfg
        x = pixel_values.to(self.dtype).view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        # a Conv3d whose stride equals its kernel is one matmul over flattened patches
        w = self.patch_embed.weight.view(c.embed_dim, -1)
        x = x.flatten(1) @ w.t()  # [N, E]
        cos, sin = self.rotary(pos_hw)
        if c.windowed:
            if windows is None:
                raise ValueError("the Qwen2.5-VL tower needs the window order (window_index)")
            unit = c.spatial_merge_size**2
            x, cos, sin = (to_windows(t, windows, unit) for t in (x, cos, sin))
        for i, blk in enumerate(self.blocks):
            if c.windowed and i not in c.fullatt_block_indexes:
                x = blk(x, cos, sin, cu_windows, window_mask)
            else:
                x = blk(x, cos, sin, cu_seqlens, mask)
        out = self.merger(x)
        if c.windowed:
            # back to raster order: the block at window place i is raster block windows[i]
            out = torch.zeros_like(out).index_copy(0, windows, out)
        return out

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        pos_hw, cu = vision_positions(grid_thw, c.spatial_merge_size)
        dev = pixel_values.device
        if not c.windowed:
            return self(pixel_values, pos_hw.to(dev), cu.tolist())
        windows, cu_windows = window_index(grid_thw, c.spatial_merge_size, c.window_units)
        return self(pixel_values, pos_hw.to(dev), cu.tolist(), windows=windows.to(dev), cu_windows=cu_windows.tolist())
