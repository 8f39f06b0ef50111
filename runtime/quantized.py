"""Quantized decoder linears out of a checkpoint: which ones, their tensors, the module swap.

Only the decoder's q/k/v/o/gate/up/down projections are ever quantized (Qwen's releases keep
the vision tower, embeddings, norms and lm_head in float); ``modules_to_not_convert`` and
``modules_in_block_to_quantize`` narrow that further. The float ``nn.Linear`` built on the meta
device is replaced by an ``Int4Linear`` / ``Int8Linear`` made straight from the packed tensors,
one layer at a time, so no full-precision decoder weight is ever allocated.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections import Counter

import torch
from torch import nn

from qvl.quant.config import QuantConfig
from qvl.quant.linear import quant_linear_class
from qvl.quant.packing import unpack_awq, unpack_gptq
from qvl.quant.weight import QuantizedWeight
from qvl.runtime.weights import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LEAVES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def file_shapes(qcfg: QuantConfig, in_f: int, out_f: int) -> dict[str, tuple[int, ...]]:
    """The tensors a quantized linear has in the file (bias and g_idx optional) and their shapes."""
    groups = math.ceil(in_f / qcfg.group_for(in_f))
    if qcfg.method == "awq":
        shapes = {"qweight": (in_f, out_f // 8), "qzeros": (groups, out_f // 8)}
    else:
        per = 32 // qcfg.bits
        shapes = {"qweight": (in_f // per, out_f), "qzeros": (groups, out_f // per), "g_idx": (in_f,)}
    return {**shapes, "scales": (groups, out_f), "bias": (out_f,)}


def decode(qcfg: QuantConfig, t: dict[str, torch.Tensor], in_f: int) -> QuantizedWeight:
    """The file's tensors of one linear -> its QuantizedWeight (q in [out, in] orientation)."""
    group = qcfg.group_for(in_f)
    if qcfg.method == "awq":
        q, zeros = unpack_awq(t["qweight"], t["qzeros"])
        g_idx = None
    else:
        q, zeros = unpack_gptq(t["qweight"], t["qzeros"], qcfg.bits)
        g_idx = t.get("g_idx")
    if g_idx is None and in_f % group:  # a short last group: spell out who belongs where
        g_idx = torch.arange(in_f, device=q.device) // group
    return QuantizedWeight(q.t().contiguous(), zeros, t["scales"], qcfg.bits, group, g_idx)


def _return_freed_memory() -> None:
    """Hand the repacking's freed temporaries back to the OS. glibc keeps blocks up to 32 MB in
    its heap, where the long-lived packed weights between them pin the holes: without this the
    RSS after loading an 8-bit 2B model is twice its weights. No-op off glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols, glibc's among them
    except (OSError, TypeError, AttributeError):
        return
    trim(0)


class QuantizedLinears:
    """The decoder linears a quantization_config makes quantized, and their file tensors."""

    def __init__(self, model: nn.Module, qcfg: QuantConfig):
        self.qcfg = qcfg
        self.targets: dict[str, nn.Linear] = {}  # qvl name -> the meta nn.Linear it replaces
        for i in range(len(model.layers)):
            for t in TARGETS:
                name = f"layers.{i}.{t}"
                # official and transformers-5 spellings, for modules_to_not_convert entries
                if qcfg.converts(f"model.{name}", f"model.language_model.{name}"):
                    self.targets[name] = model.get_submodule(name)
        self.found: dict[str, dict[str, str]] = {n: {} for n in self.targets}

    def claim(self, ours: str, file_name: str) -> bool:
        """Take ``file_name`` if it belongs to a quantized linear; False leaves it to the caller."""
        mod, _, leaf = ours.rpartition(".")
        if mod not in self.targets:
            return False
        if leaf not in LEAVES:
            raise CheckpointError(f"tensor {file_name!r}: quantization_config makes {mod} a "
                                  f"{self.qcfg.method} {self.qcfg.bits}-bit linear, which has no {leaf!r}")
        if leaf in self.found[mod]:
            raise CheckpointError(f"tensor {mod}.{leaf} given twice (under two naming schemes)")
        self.found[mod][leaf] = file_name
        return True

    def build(self, model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device, kernel: str = "auto") -> None:
        """Swap every target for its quantized module; file tensors are checked first."""
        missing = [f"{mod}.{leaf}" for mod, lin in self.targets.items()
                   for leaf in ("qweight", "qzeros", "scales") + (("bias",) if lin.bias is not None else ())
                   if leaf not in self.found[mod]]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint lacks tensors {missing[:5]}{more} (quantization_config: "
                                  f"{self.qcfg.method} {self.qcfg.bits}-bit)")
        cls = quant_linear_class(self.qcfg.bits)
        kernels, reasons = Counter(), Counter()
        for mod, lin in self.targets.items():
            want = file_shapes(self.qcfg, lin.in_features, lin.out_features)
            tensors = {}
            for leaf, name in self.found[mod].items():
                if ckpt.shape(name) != want[leaf]:
                    raise CheckpointError(f"tensor {name!r} has shape {list(ckpt.shape(name))}, a "
                                          f"{self.qcfg.method} {self.qcfg.bits}-bit linear [{lin.out_features}, "
                                          f"{lin.in_features}] with group_size {self.qcfg.group_size} needs "
                                          f"{list(want[leaf])}")
                tensors[leaf] = ckpt.get(name).to(device)
            try:
                w = decode(self.qcfg, tensors, lin.in_features)
            except ValueError as e:
                raise CheckpointError(f"{mod}: {e}") from None
            try:
                module = cls.from_weight(w, tensors.get("bias"), dtype, kernel)
            except ValueError as e:  # a kernel asked for by name that cannot run this layer
                raise ValueError(f"{mod}: {e}") from None
            model.set_submodule(mod, module)
            del tensors, w
            for name in self.found[mod].values():
                ckpt.release(name)
            if mod.endswith(TARGETS[-1]):  # once per decoder layer keeps the loading peak low too
                _return_freed_memory()
            kernels[module.kernel] += 1
            if module.fallback_reason:
                reasons[module.fallback_reason] += 1
        log.info("quantized decoder: %d %s %d-bit linears, kernels %s", len(self.targets), self.qcfg.method,
                 self.qcfg.bits, dict(kernels))
        for why, n in reasons.items():
            log.warning("%d quantized linears dequantize per call (slow): %s", n, why)
