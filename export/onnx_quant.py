"""The ONNX vision tower in 8 bits: every linear's weight held as uint8 codes, dequantized in the graph.

Each ``Gemm`` whose weight is an initializer (the tower's linears; the tracer writes
``nn.Linear`` as ``Gemm(x, W, b, transB=1)``) gets its weight replaced by
``DequantizeLinear(codes uint8 [N, K], scale [N], zero 128, axis=0)``: per output channel,
symmetric, the grid and codes of the torch tower's ``vision_quant="int8"``
(:func:`qvl.runtime.vision_quant.quantize_weight`), so both 8-bit towers compute the same
function. onnxruntime keeps DequantizeLinear out of constant folding, so the session holds the
codes and dequantizes one weight at a time as the graph runs (the bytes saved are the point); the
patch embedding (a MatMul on raw pixels), norms and biases stay float, as in torch.

Why not onnxruntime.quantization's own tools: ``quantize_dynamic`` handles MatMul and not Gemm,
and quantizes activations too (uint8 per tensor, at the mercy of a ViT's outlier channels);
``MatMulNBitsQuantizer`` handles MatMul only and needs ``onnx_ir``, a dependency qvl does not have.
Both would also need the Gemms rewritten first. This pass is weight-only, per channel, the
standard operator, and ~40 lines.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from qvl.runtime.vision_quant import quantize_weight

log = logging.getLogger(__name__)


def quantize_gemm_weights(model) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place): each Gemm's initializer weight becomes
    uint8 codes + a DequantizeLinear. Returns how many weights were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, done = [], {}  # weight name -> its dequantized output (a weight two Gemms share is read once)
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_name = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        if w_name in done:
            node.input[1] = done[w_name]
            nodes.append(node)
            continue
        if (w_name not in inits or attrs.get("transA", 0) or not attrs.get("transB", 0)
                or attrs.get("alpha", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name])  # [N, K], nn.Linear's orientation (transB=1)
        qw = quantize_weight(torch.from_numpy(w.astype(np.float32)))
        scale = qw.scales[0].float().numpy().astype(w.dtype)  # [N]: fp16 values, in the graph's dtype
        codes, zero = f"{w_name}_q8", f"{w_name}_q8_zero"
        graph.initializer.remove(inits[w_name])
        graph.initializer.extend([
            numpy_helper.from_array(qw.q.numpy(), codes),
            numpy_helper.from_array(scale, f"{w_name}_q8_scale"),
            numpy_helper.from_array(qw.zeros[0].numpy().astype(np.uint8), zero),
        ])
        deq = f"{w_name}_dequantized"
        nodes.append(helper.make_node("DequantizeLinear", [codes, f"{w_name}_q8_scale", zero], [deq], axis=0,
                                      name=f"{node.name}_dequantize"))
        node.input[1] = done[w_name] = deq
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    log.info("vision.onnx: %d linear weights in 8 bits (per output channel, DequantizeLinear)", len(done))
    return len(done)
