"""The decode step's small operations in C (``ops.c``, built into :mod:`qvl.quant.cpu`'s library).

:class:`CpuDecodeOps` is what ``Qwen2VL.decode_ops`` takes (set by the loader on the CPU): for a
one-token step, each layer's two RMSNorms (with the residual add folded into the next norm),
its attention (rotary, KV-cache write, attention over the slot's keys) and its SiLU x up become
one call each instead of ~35 torch operator calls. Their rounding follows the torch code they
replace (see ops.c); attention agrees with torch's SDPA to bf16 rounding (tests/test_decode_ops.py).

Where every decoder linear runs in qvl's CPU kernels, :meth:`CpuDecodeOps.layers` runs the whole
layer loop as one C call instead (:mod:`qvl.quant.decode_step`, the same bits).

``QVL_DECODE_OPS`` chooses: ``auto`` (the default: the one-call loop where the model allows it,
else the per-operation calls), ``ops`` (the per-operation calls only) or ``torch`` (the torch code,
e.g. to compare). Where the library is not available (``QVL_CPU_KERNEL=0``, no C compiler) the
torch code runs.
"""

from __future__ import annotations

import os

import torch

from qvl.quant import cpu, decode_step

ENV = "QVL_DECODE_OPS"
CHOICES = ("auto", "ops", "torch")
DTYPES = (torch.float32, torch.bfloat16)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class CpuDecodeOps:
    """RMSNorm, SiLU x up and one-token attention for fp32 / bf16 activations on the CPU, and
    (:meth:`layers`) all of a model's decoder layers as one call."""

    def __init__(self, lib=None, whole_step: bool = True):
        """``whole_step``: run the layer loop as one call where the model allows (:meth:`layers`)."""
        self.lib = lib or cpu.library()
        if self.lib is None:
            raise RuntimeError(f"qvl's CPU library is not available: {cpu.unavailable()}")
        self.whole_step = whole_step
        self._plan: decode_step.LayerPlan | None = None
        self._refused: tuple | None = None  # (model id, layout version, dtype) the one-call loop could not take
        self.refused_reason: str | None = None

    def layers(self, model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               input_pos: torch.Tensor, row: int) -> torch.Tensor | None:
        """``model``'s decoder layers and final norm for one token a row (``Qwen2VL.forward``'s
        decode inputs) as one C call, or None where it cannot run them (the caller runs the layers'
        ``decode``). The plan is made on the first step and again whenever the model replaces its
        linears or caches (``layout_version``)."""
        if not self.whole_step:
            return None
        plan = self._plan
        if plan is None or not plan.describes(model, x.dtype):
            key = (id(model), model.layout_version, x.dtype)
            if self._refused == key:
                return None
            why = decode_step.unsupported_reason(model, x.dtype)
            if why:
                self._refused, self.refused_reason, self._plan = key, why, None
                return None
            plan = self._plan = decode_step.LayerPlan(model, x.dtype, self.lib)
        if not plan.supports(x.shape[0]):
            return None
        return plan(x, cos, sin, mask, input_pos, row)

    def supports(self, x: torch.Tensor, norm_weight: torch.Tensor, cache) -> bool:
        """Whether a step on activations ``x`` can run here (else the model keeps its torch code)."""
        return (x.device.type == "cpu" and x.dtype in DTYPES and norm_weight.dtype == x.dtype
                and cache is not None and cache.k.dtype in (x.dtype, torch.int8))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(s) * weight, s) for s = x + residual (x where residual is None)."""
        x = x.contiguous()
        y = torch.empty_like(x)
        d = x.shape[-1]
        if residual is None:
            s, s_ptr, r_ptr = x, None, None
        else:
            s = torch.empty_like(x)
            s_ptr, r_ptr = s.data_ptr(), residual.contiguous().data_ptr()
        rc = self.lib.qvl_rms_norm(x.data_ptr(), r_ptr, s_ptr, weight.data_ptr(), x.dtype is torch.bfloat16,
                                   x.numel() // d, d, eps, y.data_ptr())
        if rc:
            raise RuntimeError(f"qvl_rms_norm failed ({rc}) on x {list(x.shape)}")
        return y, s

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(gate) * up for gate and up [..., I]; with ``up`` None, ``gate`` is one gate/up
        product [..., 2 I] and its halves are the two."""
        if up is None:
            g = gate.contiguous()
            n = g.shape[-1] // 2
            g_ptr, stride = g.data_ptr(), 2 * n
            u_ptr = g_ptr + n * g.element_size()
        else:
            g, u = gate.contiguous(), up.contiguous()
            n = stride = g.shape[-1]
            g_ptr, u_ptr = g.data_ptr(), u.data_ptr()
        y = torch.empty(*g.shape[:-1], n, dtype=g.dtype)
        rc = self.lib.qvl_silu_mul(g_ptr, u_ptr, stride, g.dtype is torch.bfloat16, g.numel() // stride, n,
                                   y.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"qvl_silu_mul failed ({rc}) on gate {list(gate.shape)}")
        return y

    def attention(self, qkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, cos: torch.Tensor,
                  sin: torch.Tensor, cache, input_pos: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
        """One token a row: qkv [B, 1, (H + 2 Hkv) Dh] (q heads, then k, then v), the rotary tables
        [B, 1, 1, Dh], the layer's :class:`~qvl.model.kv_cache.KVCache` (rows ``row..row+B-1``),
        write positions [B, 1], mask [B, 1, 1, L] (True = attend) -> [B, 1, H Dh]."""
        bsz, k_buf = qkv.shape[0], cache.k
        if row < 0 or row + bsz > k_buf.shape[0]:
            raise ValueError(f"cache rows {row}..{row + bsz - 1} outside the cache's {k_buf.shape[0]} slots")
        qkv = qkv.contiguous()
        el = qkv.element_size()
        q_ptr = qkv.data_ptr()
        k_ptr = q_ptr + n_heads * head_dim * el
        length = mask.shape[-1]
        out = torch.empty(bsz, 1, n_heads * head_dim, dtype=qkv.dtype)
        rc = self.lib.qvl_decode_attention(
            q_ptr, k_ptr, k_ptr + n_kv * head_dim * el, qkv.shape[-1], qkv.dtype is torch.bfloat16, bsz, n_heads,
            n_kv, head_dim, cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), k_buf.data_ptr(),
            cache.v.data_ptr(), _ptr(cache.k_scale), _ptr(cache.v_scale), k_buf.shape[2], row,
            input_pos.contiguous().data_ptr(), mask.contiguous().data_ptr(), length, head_dim ** -0.5,
            out.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"qvl_decode_attention failed ({rc}) on qkv {list(qkv.shape)}, {length} keys, "
                               f"rows {row}..{row + bsz - 1} of {k_buf.shape[0]}")
        return out


def for_device(device) -> CpuDecodeOps | None:
    """The ops for a model on ``device``: the C ones on the CPU where qvl's library builds, else
    None (the model's torch code); ``QVL_DECODE_OPS`` (see the module doc) chooses among them."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "torch" or torch.device(device).type != "cpu" or cpu.library() is None:
        return None
    return CpuDecodeOps(whole_step=choice == "auto")
