"""A one-token decode step over all decoder layers as one C call (``step.c``).

:class:`LayerPlan` describes a model's layers to ``qvl_decode_layers`` once (the packed weights,
norm weights and KV-cache buffers by address); each step then passes only its inputs. The C loop
calls the same kernels and decode operations with the same arguments as the layers' ``decode``
methods do through :class:`~qvl.quant.decode_ops.CpuDecodeOps`, so it gives the same bits, without
the Python between them (tests/test_decode_step.py).

It covers models whose every decoder linear runs in one of qvl's CPU kernels (``qvl-a8`` or
``qvl``, no act-order permutation) with norms in the activation dtype; :func:`unsupported_reason`
says why another model keeps the per-operation path. Embedding, head and sampling stay where they
are: one call each.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from qvl.quant import cpu
from qvl.quant.linear import FusedQuantLinear, QuantLinear

KERNELS = {"qvl-a8": 0, "qvl": 1}
ROW_LIMITS = {"qvl-a8": cpu.A8_MAX_M, "qvl": cpu.GEMV_MAX_M}


class _Linear(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_int), ("bits", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("group", ctypes.c_int), ("ablock", ctypes.c_int), ("w", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float),
                ("eps2", ctypes.c_float), ("n_qkv", ctypes.c_int), ("n_gate_up", ctypes.c_int),
                ("qkv", _Linear * 3), ("o", _Linear), ("gate_up", _Linear * 2), ("down", _Linear),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("k_scale", ctypes.c_void_p),
                ("v_scale", ctypes.c_void_p)]


class _Step(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("is_bf16", "B", "D", "H", "Hkv", "Dh", "I", "S", "row0", "L",
                                                  "threads")] + [
        ("scale", ctypes.c_float), ("final_norm", ctypes.c_void_p), ("final_eps", ctypes.c_float),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("write_pos", ctypes.c_void_p), ("mask", ctypes.c_void_p)]


PARTS = ("norm", "q/k/v", "attention", "o", "norm", "gate/up", "SiLU x up", "down")


def _projections(layer) -> tuple[list, object, list, object]:
    """The layer's linears as the decode methods call them: q/k/v (joint or parts), o, gate/up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.wqkv] if attn.wqkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.w_gate_up] if mlp.w_gate_up is not None else [mlp.gate_proj, mlp.up_proj]
    return qkv, attn.o_proj, gate_up, mlp.down_proj


def _linear_reason(lin, dtype: torch.dtype) -> str | None:
    if not isinstance(lin, (QuantLinear, FusedQuantLinear)):
        return f"a {type(lin).__name__} linear (not quantized)"
    if lin.kernel not in KERNELS:
        return f"a linear in the {lin.kernel} kernel"
    part = lin.parts[0] if isinstance(lin, FusedQuantLinear) else lin
    if part.act_dtype != dtype:
        return f"a linear packed for {part.act_dtype} activations"
    if isinstance(lin, QuantLinear) and lin.perm is not None:
        return "an act-order linear (its columns permuted)"
    if lin.weight.device.type != "cpu":
        return f"weights on {lin.weight.device.type}"
    return None


def unsupported_reason(model, dtype: torch.dtype) -> str | None:
    """Why ``model``'s decode step cannot run as one call for activations in ``dtype``, or None."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} activations"
    if model.norm.weight.dtype != dtype:
        return f"a {model.norm.weight.dtype} final norm"
    for i, layer in enumerate(model.layers):
        if layer.self_attn.kv_cache is None:
            return f"layer {i} has no KV cache"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != dtype:
                return f"layer {i}: a {norm.weight.dtype} norm"
        qkv, o, gate_up, down = _projections(layer)
        for lin in (*qkv, o, *gate_up, down):
            why = _linear_reason(lin, dtype)
            if why:
                return f"layer {i}: {why}"
    return None


def _fill(dst: _Linear, lin) -> None:
    dst.kernel, dst.bits, dst.n, dst.k = KERNELS[lin.kernel], lin.bits, lin.out_features, lin.in_features
    dst.group = lin.group_size
    dst.ablock = cpu.a8_block(lin.group_size) if lin.kernel == "qvl-a8" else 0
    dst.w, dst.scales, dst.zeros = lin.weight.data_ptr(), lin.kscales.data_ptr(), lin.kzeros.data_ptr()
    dst.bias = None if lin.bias is None else lin.bias.data_ptr()


class LayerPlan:
    """``model``'s decoder layers as ``qvl_decode_layers`` reads them (see the module doc); holds
    references to every buffer it points at, so they outlive it. It stays valid until the model
    replaces a linear or cache through its own methods (``Qwen2VL.layout_version``)."""

    def __init__(self, model, dtype: torch.dtype, lib: ctypes.CDLL):
        why = unsupported_reason(model, dtype)
        if why:
            raise ValueError(f"the decode step cannot run as one call: {why}")
        self.lib, self.dtype = lib, dtype
        self.model, self.version = weakref.ref(model), model.layout_version
        n = len(model.layers)
        self.layers = (_Layer * n)()
        keep, kernels = [], set()
        for i, layer in enumerate(model.layers):
            dst = self.layers[i]
            qkv, o, gate_up, down = _projections(layer)
            for j, lin in enumerate(qkv):
                _fill(dst.qkv[j], lin)
            for j, lin in enumerate(gate_up):
                _fill(dst.gate_up[j], lin)
            _fill(dst.o, o)
            _fill(dst.down, down)
            dst.n_qkv, dst.n_gate_up = len(qkv), len(gate_up)
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            dst.norm1, dst.norm2, dst.eps1, dst.eps2 = n1.weight.data_ptr(), n2.weight.data_ptr(), n1.eps, n2.eps
            cache = layer.self_attn.kv_cache
            dst.k_cache, dst.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            dst.k_scale = None if cache.k_scale is None else cache.k_scale.data_ptr()
            dst.v_scale = None if cache.v_scale is None else cache.v_scale.data_ptr()
            kernels.update(lin.kernel for lin in (*qkv, o, *gate_up, down))
            keep.append((qkv, o, gate_up, down, n1.weight, n2.weight, cache.tensors()))
        self._keep = keep
        attn = model.layers[0].self_attn
        self.shape = dict(D=model.norm.weight.shape[0], H=attn.n_heads, Hkv=attn.n_kv, Dh=attn.head_dim,
                          I=model.layers[0].mlp.down_proj.in_features, S=attn.kv_cache.k.shape[2])
        self.final_norm, self.final_eps = model.norm.weight, model.norm.eps
        self.max_rows = min(ROW_LIMITS[k] for k in kernels)
        self.slots = attn.kv_cache.k.shape[0]
        self._work: dict[int, torch.Tensor] = {}

    def describes(self, model, dtype: torch.dtype) -> bool:
        """Whether this plan is ``model``'s as it is now (no linear or cache replaced since) for ``dtype``."""
        return self.model() is model and self.version == model.layout_version and self.dtype == dtype

    def supports(self, bsz: int) -> bool:
        return bsz <= self.max_rows

    def _workspace(self, bsz: int) -> torch.Tensor:
        w = self._work.get(bsz)
        if w is None:
            s = self.shape
            n = self.lib.qvl_decode_layers_work(self.layers, len(self.layers), bsz, s["D"], s["H"], s["Hkv"],
                                                s["Dh"], s["I"])
            w = self._work[bsz] = torch.empty(n, dtype=self.dtype)
        return w

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                 input_pos: torch.Tensor, row: int) -> torch.Tensor:
        """x [B, 1, D] embeddings -> [B, 1, D] final-normed hidden states; the rest as
        :meth:`CpuDecodeOps.attention` takes them."""
        bsz = x.shape[0]
        if row < 0 or row + bsz > self.slots:
            raise ValueError(f"cache rows {row}..{row + bsz - 1} outside the cache's {self.slots} slots")
        s = self.shape
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        input_pos, mask = input_pos.contiguous(), mask.contiguous()
        out = torch.empty_like(x)
        st = _Step(self.dtype is torch.bfloat16, bsz, s["D"], s["H"], s["Hkv"], s["Dh"], s["I"], s["S"], row,
                   mask.shape[-1], torch.get_num_threads(), s["Dh"] ** -0.5, self.final_norm.data_ptr(),
                   self.final_eps, cos.data_ptr(), sin.data_ptr(), input_pos.data_ptr(), mask.data_ptr())
        rc = self.lib.qvl_decode_layers(self.layers, len(self.layers), ctypes.byref(st), x.data_ptr(),
                                        self._workspace(bsz).data_ptr(), out.data_ptr())
        if rc:
            layer, part = divmod(-rc, 10)
            if layer - 1 == len(self.layers):
                where = "the final norm"
            else:
                where = f"layer {layer - 1}'s " + (PARTS[part - 1] if part else "description")
            raise RuntimeError(f"qvl_decode_layers failed in {where} (x {list(x.shape)}, {mask.shape[-1]} keys, "
                               f"rows {row}..{row + bsz - 1})")
        return out
