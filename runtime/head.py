"""A quantized output head, made at load from the checkpoint's own.

A 2B model's head is 40% of what an int4 decode step reads (151936 x 1536 bf16 is 467 MB, the
int4 decoder 0.69 GB), so an 8-bit head cuts the step's bytes by a fifth. ``head="int8"``: 8 bits
per output channel, symmetric (one fp16 scale per vocabulary row, zero point 128);
``head="int4"``: 4 bits in asymmetric groups of 128 columns (whole rows where the width is no
multiple of 128), as the decoder's GPTQ layers. Both round to nearest from the checkpoint's
weight (``qvl.quant.rtn``) and run in the quantized linears' kernels. With tied embeddings the
token lookup keeps reading the checkpoint's exact rows: the quantized head is a second tensor
(+233 MB int8, +125 MB int4 on the 2B shapes), so only the logits change, never the inputs.
Default ``"checkpoint"``: the artifact's head as is.
"""

from __future__ import annotations

import logging

import torch

from qvl.quant.linear import quant_linear_class
from qvl.quant.rtn import Grid, rtn
from qvl.quant.weight import QuantizedWeight

log = logging.getLogger(__name__)

HEADS = ("int8", "int4")
_ROWS_AT_ONCE = 8192  # rows quantized per step: the fp32 temporaries stay ~50 MB, not the head's 0.9 GB


def check_head(head: str) -> None:
    if head != "checkpoint" and head not in HEADS:
        raise ValueError(f"head {head!r}: use 'checkpoint' (the artifact's own), 'int8' or 'int4'")


def head_grid(head: str, hidden: int) -> Grid:
    if head == "int8":
        return Grid(bits=8, group_size=-1, sym=True)
    return Grid(bits=4, group_size=128 if hidden % 128 == 0 else -1, sym=False)  # small models: whole rows


def quantized_head_weight(weight: torch.Tensor, head: str) -> QuantizedWeight:
    """Round-to-nearest codes of ``weight`` [V, D] on ``head``'s grid, a block of rows at a time."""
    grid = head_grid(head, weight.shape[1])
    parts = [rtn(weight[i : i + _ROWS_AT_ONCE], grid) for i in range(0, weight.shape[0], _ROWS_AT_ONCE)]
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.zeros for p in parts], dim=1),
                           torch.cat([p.scales for p in parts], dim=1), grid.bits, parts[0].group_size)


def quantize_head(model, head: str, kernel: str = "auto") -> None:
    """Replace ``model.lm_head`` by its ``head`` quantization (in place); "checkpoint": no change."""
    check_head(head)
    if head == "checkpoint":
        return
    weight = model.lm_head.weight.detach()
    qw = quantized_head_weight(weight, head)
    layer = quant_linear_class(qw.bits).from_weight(qw, dtype=weight.dtype, kernel=kernel)
    if layer.kernel == "dequant":  # would dequantize the whole head every step: slower than the original
        raise ValueError(f"head={head!r} has no quantized kernel on {weight.device} for {weight.dtype} activations "
                         f"({layer.fallback_reason}); keep head='checkpoint' here")
    model.lm_head = layer
    log.info("head quantized to %s (%s kernel): %.0f MB read a step instead of %.0f MB", head, layer.kernel,
             layer.nbytes() / 2**20, weight.numel() * weight.element_size() / 2**20)
