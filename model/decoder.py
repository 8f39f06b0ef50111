"""Qwen2 decoder layer: RMSNorm, GQA attention with QKV bias and M-RoPE, SwiGLU MLP.

Linears keep the checkpoint's own split (q/k/v, gate/up/down), so a weight is used straight
from the memory-mapped file and a quantized checkpoint maps one tensor group to one module;
fusing would force a copy at load and saves only ~1% of a CPU decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl.model.config import TextConfig
from qvl.model.kv_cache import KVCache
from qvl.model.rope import apply_rotary


class Linear(nn.Linear):
    """nn.Linear whose one-token bf16 product on the CPU is a matrix-vector product.

    Decode multiplies one activation row by every weight, and on the CPU torch's bf16 gemv streams
    a large weight about a third faster than its [1, K] x [K, N] gemm. Below ~4M weights, and in
    fp16 (where gemv is slower) or fp32 (equal), the gemm stays.
    """

    MV_MIN_WEIGHTS = 4 << 20

    def forward(self, x):
        w = self.weight
        if (x.numel() == self.in_features and w.dtype == torch.bfloat16 and w.device.type == "cpu"
                and w.numel() >= self.MV_MIN_WEIGHTS):
            y = torch.mv(w, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the activation dtype: the reference's rounding order (torch's
        # fused rms_norm gives the bits of x * rsqrt(mean(x^2) + eps) in one op instead of five)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_dim, self.kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.q_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.kv_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.kv_dim, bias=True)
        self.o_proj = Linear(self.q_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, kv_len: int, row: int = 0):
        """``cos``, ``sin``: :class:`MRope`'s tables [B, T, 1, Dh]."""
        bsz, seqlen, _ = x.shape
        heads = self.n_heads + self.n_kv
        # q and k side by side, so one rotary pass covers both: [B, T, H + Hkv, Dh]
        qk = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1).view(bsz, seqlen, heads, self.head_dim)
        qk = apply_rotary(qk, cos, sin)
        q = qk[:, :, : self.n_heads].transpose(1, 2)  # [B, H, T, Dh]
        k = qk[:, :, self.n_heads :].transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, row, kv_len)  # an int8 cache dequantizes here
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, self.q_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos, kv_len, row: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len, row)
        return x + self.mlp(self.post_attention_layernorm(x))
