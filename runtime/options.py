"""The options of ``qvl.load``, declared once (the engine and the CLI read them from here).

Torch-free, so the command line can build its flags without loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadOptions:
    """What ``qvl.load`` takes besides the checkpoint path (the one place these are declared).

    ``dtype``: "float32", "bfloat16", "float16" or "auto" (the checkpoint's).
    ``max_seq_len``, ``max_batch``: the KV cache, ``[max_batch, kv_heads, max_seq_len, head_dim]``
    per layer, allocated once at load; ``max_batch`` requests decode side by side, one per slot.
    ``max_queue``: requests that may wait for a slot; one more is refused with ``QueueFullError``.
    ``prefill_chunk``: prompt tokens per prefill step, the most a new prompt delays running streams.
    ``allow_remote``: fetch http(s) images/videos named in messages (default: the
    ``QVL_ALLOW_REMOTE`` env var, else off); limits in ``engine.fetch_policy``.
    ``allow_private_addresses``: with remote fetching on, also fetch from hosts that resolve to
    loopback, private, link-local (cloud metadata) or other non-public addresses (default: the
    ``QVL_ALLOW_PRIVATE_ADDRESSES`` env var, else off: every resolved address and redirect is checked).
    ``vision_backend``: "torch", or "onnx" to run the vision tower from ``path/vision.onnx`` in
    onnxruntime (see ``qvl export onnx``); its torch weights are then not loaded.
    ``quant_kernel`` (quantized checkpoints): "auto" (the fastest exact kernel that runs here), "qvl"
    (qvl's AVX-512 or AVX2 CPU kernel), "qvl-a8" (qvl's CPU kernel with each row of activations
    rounded to int8 per 32 columns, as llama.cpp's Q8_0: integer dot products, the weights read once
    for up to 64 rows, so batched decode and short prefills are faster; not exact, KL and greedy
    agreement in bench/results/a8.md), "int4pack" (torch's int4 kernel) or "dequant"; a named
    kernel that cannot run a layer is an error.
    ``decode_kv``: "full" (fixed shapes, the whole cache under a mask) or "live" (the longest live
    prefix); default "full" where the step is a CUDA graph, else "live".
    ``cuda_graphs``: capture the decode step per batch bucket (default: on for CUDA devices).
    ``max_image_pixels``, ``max_decode_pixels``, ``max_vision_tokens``: what one request's pictures
    may cost (``qvl.runtime.inputs.InputLimits``: the pixels an image may be resized to, the pixels
    a file may decode to, read from its header, and the vision tokens of a request).
    ``head``: "checkpoint" (the artifact's own output head, exact), "int8" (8 bits per vocabulary
    row) or "int4" (4 bits in groups of 128), made at load by rounding the checkpoint's head; a
    2B decode step then reads a fifth fewer bytes (``qvl.runtime.head``).
    ``prefix_cache_mb``: KV of ended requests kept so a new prompt that begins the same way (the
    same instructions, a chat's earlier turns, the same pictures) prefills only what follows;
    ``vision_cache_mb``: vision-tower outputs kept per picture. Both least recently used out
    first; 0 turns one off (``qvl.runtime.prefix_cache``).
    ``memory_budget``: the most memory the process may peak at ("4GB", "3.5GiB"; GB = 10^9 bytes),
    planned from the checkpoint's headers before anything is allocated (``qvl.runtime.plan``):
    ``MemoryBudgetError`` naming the part that does not fit; ``max_seq_len``, ``max_batch`` and the
    cache sizes not given are chosen to fit; a request whose pictures would pass it is refused, and
    a request's images are encoded in groups the budget holds.
    ``vision_quant``: "none" (the checkpoint's float tower) or "int8" (the torch tower's linears held
    as int8, per output channel, rounded at load: ~half the tower's bytes; ``qvl.runtime.vision_quant``).
    The ONNX tower's precision is chosen at export (``qvl export onnx --vision-quant int8``).
    ``kv_cache_dtype``: "auto" (the model dtype) or "int8" (codes + one fp16 scale per head and
    position, dequantized as attention reads them: ~half a bf16 cache's bytes; ``qvl.model.kv_cache``).
    """

    device: str = "cpu"
    dtype: str = "float32"
    max_seq_len: int = 4096
    max_batch: int = 1
    max_queue: int = 64
    prefill_chunk: int = 256
    allow_remote: bool | None = None
    allow_private_addresses: bool | None = None
    vision_backend: str = "torch"
    quant_kernel: str = "auto"
    decode_kv: str | None = None
    cuda_graphs: bool | None = None
    max_image_pixels: int = 16384 * 28 * 28
    max_decode_pixels: int = 64_000_000
    max_vision_tokens: int | None = None
    head: str = "checkpoint"
    prefix_cache_mb: float = 256.0
    vision_cache_mb: float = 64.0
    memory_budget: str | int | None = None
    vision_quant: str = "none"
    kv_cache_dtype: str = "auto"


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(LoadOptions)]
