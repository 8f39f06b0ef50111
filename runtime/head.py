"""A quantized output head, made at load from the checkpoint's own.

A 2B model's head is 40% of what an int4 decode step reads (151936 x 1536 bf16 is 467 MB, the
int4 decoder 0.69 GB), so an 8-bit head cuts the step's bytes by a fifth. ``head="int8"``: 8 bits
per output channel, symmetric (one fp16 scale per vocabulary row, zero point 128);
``head="int4"``: 4 bits in asymmetric groups of 128 columns (whole rows where the width is no
multiple of 128), as the decoder's GPTQ layers. Both round to nearest from the checkpoint's
weight (``qvl.quant.rtn``) and run in the quantized linears' kernels.

With tied embeddings one tensor is kept, the quantized head: the token lookup reads its rows
(:class:`TiedLookup`, ``dequantized_head[ids]`` exactly) and the float table is dropped, so the
2B shapes hold 233 MB (int8) or 125 MB (int4) where the table and head held 467 MB + the head.
The cheapest in memory wins over exact input rows because an input row moves by at most half a
scale per weight, the same rounding the logits already take. Where the head runs in torch's
int4pack layout (no qvl CPU kernel: CUDA, non-x86), whose codes cannot be read back by row, the
float table stays for the lookup beside the head.

The head is rounded and packed a block of rows at a time and each block's file pages dropped
(:func:`qvl.runtime.weights.release_mapped`) before the next is read, so at load neither the
float table nor a second copy of the codes is ever whole in memory.
Default ``"checkpoint"``: the artifact's head as is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qvl.quant import cpu
from qvl.quant.linear import CPU_KERNELS, QuantLinear, quant_linear_class
from qvl.quant.rtn import Grid, rtn
from qvl.quant.weight import QuantizedWeight
from qvl.runtime.quantized import _return_freed_memory
from qvl.runtime.weights import release_mapped

log = logging.getLogger(__name__)

HEADS = ("int8", "int4")
# rows rounded and packed per step: rounding holds ~3 fp32 copies of a block (~40 MB on the 2B
# shapes), which at load sit on top of everything else; a multiple of every row block of the CPU
# kernels' layouts (4 rows qvl, 64 qvl-a8), so the blocks' packed buffers are consecutive slices of the whole's
_ROWS_AT_ONCE = 2048
_IDS_AT_ONCE = 1024  # token ids looked up per step: fp32 temporaries of ~6 MB on the 2B shapes


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


def quantized_head(weight: torch.Tensor, head: str, kernel: str = "auto") -> QuantLinear:
    """The ``QuantLinear`` of ``weight`` [V, D] on ``head``'s grid, for activations of its dtype: in a
    CPU kernel's layout built block by block (each block's file pages dropped once rounded), else whole.
    Either way its weight is :func:`quantized_head_weight`'s."""
    cls, grid = quant_linear_class(head_grid(head, weight.shape[1]).bits), head_grid(head, weight.shape[1])
    starts = list(range(0, weight.shape[0], _ROWS_AT_ONCE))

    def block(i: int) -> QuantLinear:
        rows = weight[i : i + _ROWS_AT_ONCE]
        layer = cls.from_weight(rtn(rows, grid), dtype=weight.dtype, kernel=kernel)
        release_mapped(rows)
        return layer

    first = block(0)
    if len(starts) == 1:
        return first
    last = block(starts[-1])
    if first.kernel not in CPU_KERNELS or last.kernel != first.kernel:  # a layout not blocked by rows
        del first, last
        layer = cls.from_weight(quantized_head_weight(weight, head), dtype=weight.dtype, kernel=kernel)
        release_mapped(weight)
        return layer
    full = {}
    for (name, b), (_, b_last) in zip(first.named_buffers(), last.named_buffers()):
        full[name] = b.new_empty((b.shape[0] * (len(starts) - 1) + b_last.shape[0], *b.shape[1:]))
        full[name][: b.shape[0]] = b
        full[name][full[name].shape[0] - b_last.shape[0] :] = b_last
    for j, i in enumerate(starts[1:-1], start=1):
        for name, b in block(i).named_buffers():
            full[name][j * b.shape[0] : (j + 1) * b.shape[0]] = b
    for name, b in full.items():
        first.register_buffer(name, b, persistent=False)
    first.out_features = weight.shape[0]
    del last
    _return_freed_memory()
    return first


def head_rows(layer: QuantLinear, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` [...] of ``layer``'s dequantized weight in ``dtype``: [..., D], bit for bit
    ``layer.dequantize(dtype)[ids]``, read from the packed codes of the qvl / qvl-a8 layouts
    (``qvl.quant.cpu.pack`` / ``pack_a8``) without dequantizing anything else."""
    flat = ids.reshape(-1).long()
    k, bits = layer.in_features, layer.bits
    group = torch.arange(k, device=flat.device) // layer.group_size  # [K]
    out = torch.empty(len(flat), k, dtype=dtype, device=flat.device)
    for i in range(0, len(flat), _IDS_AT_ONCE):
        n = flat[i : i + _IDS_AT_ONCE]
        if layer.kernel == "qvl":  # weight [N/4, K/32 (8-bit) or K/64 (4-bit), 4, 32], params [N/4, G, 4]
            blk, r = n // cpu.ROWS, n % cpu.ROWS
            codes, zeros, scales = layer.weight[blk, :, r], layer.kzeros[blk, :, r], layer.kscales[blk, :, r]
            if bits == 4:  # a chunk's 32 bytes hold 64 columns: 0..31 low nibbles, 32..63 high
                codes = torch.stack([codes & 0xF, codes >> 4], dim=2)
        elif layer.kernel == "qvl-a8":  # weight [N/64, K/4 or K/8, 4 vectors, 16 lanes, 4], params [N/64, G, 64]
            lanes = cpu.A8_NT // 4
            tile, row = n // cpu.A8_NT, n % cpu.A8_NT
            codes = layer.weight[tile, :, row // lanes, row % lanes]
            zeros, scales = layer.kzeros[tile, :, row], layer.kscales[tile, :, row]
            if bits == 4:  # a k-step's 4 bytes hold 8 columns: j low nibble, j + 4 high
                codes = torch.stack([codes & 0xF, codes >> 4], dim=2)
        else:
            raise ValueError(f"the {layer.kernel} layout's rows cannot be read back (qvl and qvl-a8 can)")
        codes = codes.reshape(len(n), k)  # [B, K]
        w = (codes.float() - zeros.float()[:, group]) * scales.float()[:, group]
        out[i : i + len(n)] = w.to(dtype)
    return out.reshape(*ids.shape, k)


class TiedLookup(nn.Module):
    """Token embeddings of a tied checkpoint read from its quantized head: ``forward(ids)`` is
    ``dequantized_head[ids]`` (:func:`head_rows`). The head is this module's child as well as the
    model's ``lm_head``: one set of buffers, counted once."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.head = head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        # the table's shape and dtype, holding nothing (callers read ``embed_tokens.weight.dtype``)
        self.weight = torch.empty(head.out_features, head.in_features, dtype=dtype, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return head_rows(self.head, ids, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the {self.head.bits}-bit head"


def quantize_head(model, head: str, kernel: str = "auto") -> None:
    """Replace ``model.lm_head`` by its ``head`` quantization (in place), and with tied embeddings
    ``model.embed_tokens`` by a :class:`TiedLookup` of it where its layout can be read by row;
    "checkpoint": no change."""
    check_head(head)
    if head == "checkpoint":
        return
    weight = model.lm_head.weight.detach()
    tied = weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    layer = quantized_head(weight, head, kernel)
    if layer.kernel == "dequant":  # would dequantize the whole head every step: slower than the original
        raise ValueError(f"head={head!r} has no quantized kernel on {weight.device} for {weight.dtype} activations "
                         f"({layer.fallback_reason}); keep head='checkpoint' here")
    model.lm_head = layer
    lookup = "untied"
    if tied and layer.kernel in CPU_KERNELS:
        model.embed_tokens = TiedLookup(layer, weight.dtype)
        lookup = "rows of the quantized head, the float table dropped"
    elif tied:
        lookup = f"the float table (the {layer.kernel} layout cannot be read by row)"
    del weight
    _return_freed_memory()
    log.info("head quantized to %s (%s kernel): %.0f MB read a step instead of %.0f MB; token lookup: %s", head,
             layer.kernel, layer.nbytes() / 2**20, layer.out_features * layer.in_features *
             model.embed_tokens.weight.element_size() / 2**20, lookup)
