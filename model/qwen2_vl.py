"""The Qwen2-VL model: vision tower + Qwen2 decoder + head. Pure math.

``forward(embeds, positions, input_pos, mask, kv_len) -> hidden`` and ``logits(hidden)``;
sampling, loading and position bookkeeping live in ``qvl.runtime``.
"""

from __future__ import annotations

import torch
from torch import nn

from qvl.model.config import Qwen2VLConfig
from qvl.model.decoder import DecoderLayer, Linear, RMSNorm
from qvl.model.kv_cache import KVCache
from qvl.model.rope import MRope
from qvl.model.vision import VisionRotary, VisionTower


class Qwen2VL(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        t = cfg.text
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        # weights always come from a checkpoint: _weight skips the random init, whose normal_ on
        # the meta device imports torch._dynamo (~0.7 s of every load)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, _weight=torch.empty(t.vocab_size, t.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = Linear(t.hidden_size, t.vocab_size, bias=False)
        self.rope = MRope(t.head_dim, t.rope_theta, t.mrope_section)
        self.max_batch = self.max_seq = 0
        # the one-token step's norms, attention and SiLU x up as fused calls, or all its layers as one
        # (qvl.quant.decode_ops' CpuDecodeOps, set by the loader on the CPU); None: the layers' torch code
        self.decode_ops = None
        # counts replacements of the layers' linears or caches (moves, casts, fusing, new caches):
        # what a description of their buffers by address (the decode ops' plan) checks it against
        self.layout_version = 0

    def init_buffers(self, device=None):
        """(Re)build the computed rotary tables, e.g. after construction on the meta device."""
        t, v = self.cfg.text, self.cfg.vision
        self.rope = MRope(t.head_dim, t.rope_theta, t.mrope_section).to(device)
        self.visual.rotary = VisionRotary(v.head_dim, v.rope_theta).to(device)

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def setup_caches(self, max_batch: int, max_seq: int, dtype: torch.dtype, device=None):
        t = self.cfg.text
        self.max_batch, self.max_seq = max_batch, max_seq
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, t.num_key_value_heads, max_seq, t.head_dim, dtype, device)
        self.layout_version += 1

    def fuse_linears(self) -> None:
        """Each layer's q/k/v and gate/up as one call where their type allows (DecoderLayer.fuse_linears)."""
        for layer in self.layers:
            layer.fuse_linears()
        self.layout_version += 1

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.layout_version += 1  # buffers moved or cast are other tensors
        return out

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor | None = None, kv_len: int | None = None, row: int = 0) -> torch.Tensor:
        """embeds [B, T, D], M-RoPE ids [3, B, T], cache positions ``input_pos`` [T] (shared by
        the rows) or [B, 1] (one per row, T = 1), written in cache rows ``row .. row+B-1``.

        ``mask`` [B, 1, T, kv_len] bool (True = attend) or None for a causal prefill that
        starts at position 0. Keys beyond ``kv_len`` (default: the whole cache) are not read.
        Returns the final-normed hidden states [B, T, D]. A decode step (T = 1, ``input_pos`` [B, 1],
        a mask) runs the layers' ``decode`` through :attr:`decode_ops` where it supports the inputs.
        """
        kv_len = self.max_seq if kv_len is None else kv_len
        cos, sin = self.rope(positions, embeds.dtype)
        ops = self.decode_ops
        if (ops is not None and input_pos.dim() == 2 and mask is not None and embeds.shape[1] == 1
                and ops.supports(embeds, self.norm.weight, self.layers[0].self_attn.kv_cache)):
            whole = getattr(ops, "layers", None)  # every layer as one call, where the ops can
            hidden = whole(self, embeds, cos, sin, mask, input_pos, row) if whole is not None else None
            if hidden is not None:
                return hidden
            x, residual = embeds, None
            for layer in self.layers:
                x, residual = layer.decode(x, residual, cos, sin, mask, input_pos, row, ops)
            return ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)[0]
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, kv_len, row)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
