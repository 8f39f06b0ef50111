"""Qwen2 decoder layer: RMSNorm, GQA attention with QKV bias and M-RoPE, SwiGLU MLP.

Linears keep the checkpoint's own split (q/k/v, gate/up/down), so a float weight is used straight
from the memory-mapped file and a quantized checkpoint maps one tensor group to one module. Where
the linears' type can run several as one kernel call (``type(linear).fuse``: qvl's quantized CPU
kernels, whose layouts are repacked at load anyway), :meth:`DecoderLayer.fuse_linears` joins q/k/v
and gate/up: a kernel call has a fixed cost (the thread fork, the activation pass) that the small
k and v products pay again in full.

Each module's ``decode`` is its ``forward`` for a one-token step with the small operations (the
norms and the residual adds they fold in, rotary + KV write + attention, SiLU x up) handed to an
``ops`` object, qvl.quant.decode_ops' fused C calls on the CPU; ``forward`` is the reference.
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


def _fused(parts):
    """``type(parts[0]).fuse(parts)`` where the type has one (None where it has not, or declines)."""
    fuse = getattr(type(parts[0]), "fuse", None)
    return fuse(parts) if fuse is not None else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the activation dtype: the reference's rounding order (torch's
        # fused rms_norm gives the bits of x * rsqrt(mean(x^2) + eps) in one op instead of five)
        x32 = x.float()
        if torch.jit.is_tracing():  # the ONNX exporter has no aten::rms_norm: the same math in its five ops
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            normed = F.rms_norm(x32, (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


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
        self.wqkv = None  # q, k, v as one call, where the linears fuse

    def fuse(self) -> None:
        self.wqkv = _fused([self.q_proj, self.k_proj, self.v_proj])

    def _apply(self, fn, recurse=True):
        self.wqkv = None  # it holds the parts' buffers as they were: moved or cast, they are others
        return super()._apply(fn, recurse)

    def forward(self, x, cos, sin, mask, input_pos, kv_len: int, row: int = 0):
        """``cos``, ``sin``: :class:`MRope`'s tables [B, T, 1, Dh]."""
        bsz, seqlen, _ = x.shape
        heads = self.n_heads + self.n_kv
        # q and k side by side, so one rotary pass covers both: [B, T, H + Hkv, Dh]
        if self.wqkv is not None:
            qkv = self.wqkv(x)  # [B, T, (H + 2 Hkv) Dh]
            qk, v = qkv[..., : self.q_dim + self.kv_dim], qkv[..., self.q_dim + self.kv_dim :]
        else:
            qk, v = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x)
        qk = apply_rotary(qk.view(bsz, seqlen, heads, self.head_dim), cos, sin)
        q = qk[:, :, : self.n_heads].transpose(1, 2)  # [B, H, T, Dh]
        k = qk[:, :, self.n_heads :].transpose(1, 2)  # [B, Hkv, T, Dh]
        v = v.view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, row, kv_len)  # an int8 cache dequantizes here
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, self.q_dim))

    def decode(self, x, cos, sin, mask, input_pos, row, ops):
        """:meth:`forward` for one token a row (``input_pos`` [B, 1]), through ``ops.attention``."""
        if self.wqkv is not None:
            qkv = self.wqkv(x)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        out = ops.attention(qkv, self.n_heads, self.n_kv, self.head_dim, cos, sin, self.kv_cache, input_pos, mask, row)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w_gate_up = None  # gate and up as one call, where the linears fuse

    def fuse(self) -> None:
        self.w_gate_up = _fused([self.gate_proj, self.up_proj])

    def _apply(self, fn, recurse=True):
        self.w_gate_up = None
        return super()._apply(fn, recurse)

    def forward(self, x):
        if self.w_gate_up is not None:
            gate_up = self.w_gate_up(x)  # [B, T, 2 I]
            n = gate_up.shape[-1] // 2
            h = F.silu(gate_up[..., :n]) * gate_up[..., n:]
            del gate_up  # not held through down_proj: a prefill chunk's [T, 2 I] is the MLP's largest transient
            return self.down_proj(h)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode(self, x, ops):
        """:meth:`forward` with SiLU x up as one ``ops.silu_mul`` call."""
        if self.w_gate_up is not None:
            return self.down_proj(ops.silu_mul(self.w_gate_up(x)))  # its [..., 2 I] halves
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def fuse_linears(self) -> None:
        """Join q/k/v and gate/up into one call each where their type allows (see the module doc)."""
        self.self_attn.fuse()
        self.mlp.fuse()

    def forward(self, x, cos, sin, mask, input_pos, kv_len, row: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len, row)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, residual, cos, sin, mask, input_pos, row, ops):
        """:meth:`forward` for one token a row through ``ops`` (see ``Qwen2VL.decode_ops``).

        ``x`` is what the previous layer added (its MLP output; the embeddings at the first layer)
        and ``residual`` the stream it adds to (None at the first layer). Returns this layer's
        (MLP output, stream before it): each add is done by the norm that reads its sum.
        """
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h, residual = ops.rms_norm(x, norm1.weight, norm1.eps, residual)
        a = self.self_attn.decode(h, cos, sin, mask, input_pos, row, ops)
        h, residual = ops.rms_norm(a, norm2.weight, norm2.eps, residual)
        return self.mlp.decode(h, ops), residual
