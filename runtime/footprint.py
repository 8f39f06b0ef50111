"""What each part of a model costs held by qvl, from its checkpoint's headers alone.

Torch-free: every figure comes from config.json, the quantization config and the safetensors
headers (names, dtypes, shapes), never from the weights. Each part is one function taking the
option that changes it (``head``, ``dtype``, ``quant_kernel``, ``vision_quant``,
``kv_cache_dtype``), so a new way of holding a part is one function's business;
:mod:`qvl.runtime.plan` adds the parts up against a budget.

The vision tower's activation peak is a measured model: per patch of one tower call,
``VISION_UNITS * embed_dim * s`` bytes (s the tower's element size, bf16 and fp32 alike), plus
``VISION_FIXED``. Attention is block-diagonal per image / frame pair and runs fused (no [N, N]
scores), so the peak is linear in the call's patches; the block MLP runs over chunks of patches
(``qvl.model.vision.MLP_CHUNK_BYTES``), so its [N, 4E] temporaries are a fixed part, not per
patch. The figures were fitted with ``python -m qvl.bench.memory --fit``
(bench/results/memory.md) with glibc's mmap threshold pinned (``plan.pin_allocator``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from qvl.model.config import ConfigError, Qwen2VLConfig, read_json_object
from qvl.quant.config import QuantConfig

# python + torch + qvl + tokenizer + thread pools after a first request (tiny checkpoint, torch 2.13
# CPU). torch's libraries are file-backed: the pages the page cache already holds count as resident
# when mapped, so the same process measures ~290 MB on a cold cache and ~370 MB just after an
# install; the plan takes the warm figure, with room, so a budget is never passed.
RUNTIME_BYTES = 400_000_000
# vision tower activations per patch of one call, in units of embed_dim * element size, and the
# part that does not grow with the patches (fitted: bench/results/memory.md)
VISION_UNITS = 15.6
VISION_FIXED = 10_000_000
# float weight a many-row call dequantizes at once, a block of output channels: an int8 vision
# linear (qvl.runtime.vision_quant.VisionInt8Linear) and a quantized decoder linear in qvl's CPU
# kernels (qvl.quant.linear.DEQUANT_BLOCK_BYTES, which tests/test_plan.py checks is this figure)
DEQUANT_BLOCK_BYTES = 4 << 20
PATCH_VALUES = 1176  # 3 channels x 2 frames x 14 x 14: one float32 pixel row of the processor

_ELEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_SIZE = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_FILE_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_QUANT_LINEAR = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.\d+\.(self_attn|mlp)\.(\w+_proj)\.qweight$")


def parse_bytes(text) -> int:
    """``"4GB"`` -> 4_000_000_000. GB, MB, KB are powers of ten (as RSS is reported here), GiB,
    MiB, KiB powers of two; a bare number is bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {text!r}: give a size such as '4GB', '3.5GiB' or '512MB'")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"memory budget {text!r} must be positive")
    return int(value)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# the checkpoint, from its headers


@dataclass(frozen=True)
class CheckpointInfo:
    cfg: Qwen2VLConfig
    qcfg: QuantConfig | None
    tensors: dict  # file name -> (safetensors dtype, shape)
    torch_dtype: str  # config.json's dtype ("auto" resolves to it)

    def visual(self):
        return {k: v for k, v in self.tensors.items() if k.startswith(("visual.", "model.visual."))}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ConfigError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConfigError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header


def read_checkpoint(path) -> CheckpointInfo:
    """config.json, its quantization_config and every tensor's dtype and shape (headers only)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    raw = read_json_object(path / "config.json")
    cfg = Qwen2VLConfig.from_hf(raw)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weights")
    tensors = {}
    for f in files:
        for name, e in _header(f).items():
            tensors[name] = (e["dtype"], tuple(e["shape"]))
    dtype = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("dtype") or "float32"
    return CheckpointInfo(cfg, QuantConfig.from_hf(cfg.quantization) if cfg.quantization else None, tensors,
                          str(dtype))


def compute_dtype(info: CheckpointInfo, dtype: str) -> str:
    name = info.torch_dtype if dtype == "auto" else dtype
    if name not in _DTYPE_SIZE:
        raise ValueError(f"dtype {name!r} not supported; use float32, bfloat16, float16 or 'auto'")
    return name


def _numel(shape) -> int:
    return math.prod(shape)


# --------------------------------------------------------------------------------------------
# one function per part


def vision_tower_bytes(info: CheckpointInfo, dtype: str, vision_backend: str = "torch",
                       vision_quant: str = "none") -> int:
    """The torch tower's parameters in the compute dtype, or with ``vision_quant="int8"`` its linears
    as int8 codes + an fp16 scale and uint8 zero per row + an fp32 bias (``qvl.runtime.vision_quant``);
    0 when onnxruntime runs the tower (not planned: see :func:`make_plan`)."""
    if vision_backend != "torch":
        return 0
    s = _DTYPE_SIZE[compute_dtype(info, dtype)]
    total = 0
    for name, (_, shape) in info.visual().items():
        linear = vision_quant == "int8" and len(shape) == 2 and name.endswith(".weight")
        total += shape[0] * (shape[1] + 3) if linear else _numel(shape) * s
        if vision_quant == "int8" and len(shape) == 1 and name.endswith(".bias") and \
                (name[: -len("bias")] + "weight") in info.tensors and \
                len(info.tensors[name[: -len("bias")] + "weight"][1]) == 2:
            total += shape[0] * (4 - s)  # a quantized linear's bias is fp32
    return total


def qvl_kernel_here() -> bool:
    """Whether qvl's CPU kernel is likely to run here, without building it (``qvl.quant.cpu``
    decides for sure; the engine asks it)."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("QVL_CPU_KERNEL", "1") != "0"


def _kernel_for(bits: int, n: int, k: int, group: int, dtype: str, device: str, kernel: str,
                qvl_kernel: bool | None = None) -> str:
    """The packing ``quant_kernel`` gives one layer (``QuantLinear.from_weight``'s choice, from shapes)."""
    qvl_kernel = qvl_kernel_here() if qvl_kernel is None else qvl_kernel
    qvl_ok = qvl_kernel and device == "cpu" and dtype in ("float32", "bfloat16") and n % 4 == 0 and \
        group % (64 if bits == 4 else 32) == 0 and k % group == 0
    kg = next((g for g in (256, 128, 64, 32) if group % g == 0), None)
    int4pack_ok = kg is not None and k % group == 0 and dtype == "bfloat16" and \
        (n % 16 == 0 if device == "cpu" else n % 8 == 0)
    if kernel == "auto":
        return "qvl" if qvl_ok else "int4pack" if int4pack_ok else "dequant"
    return kernel


def quant_linear_bytes(bits: int, n: int, k: int, group: int, dtype: str, kernel: str, bias: bool,
                       act_order: bool = False) -> int:
    """Bytes one ``Int4Linear`` / ``Int8Linear`` [n, k] holds in ``kernel``'s packing (``QuantLinear.nbytes``)."""
    s = _DTYPE_SIZE[dtype]
    groups = math.ceil(k / group)
    if kernel in ("qvl", "qvl-a8"):  # codes, fp16 scales, uint8 zeros per (row, group), fp32 bias
        rows = -(-n // 64) * 64 if kernel == "qvl-a8" else n  # a8 tiles of 64 rows, the last padded
        return rows * k * bits // 8 + rows * groups * 3 + 4 * n * bias + 8 * k * act_order
    if kernel == "int4pack":  # 8-bit runs as two nibbles: twice the groups
        kg = next(g for g in (256, 128, 64, 32) if group % g == 0)
        halves = 2 if bits == 8 else 1
        return n * k * bits // 8 + halves * (k // kg) * n * 2 * s + s * n * bias + 8 * k * act_order
    # dequant: codes, the file's fp16 scales, int16 zeros, an int64 group index
    return n * k * bits // 8 + groups * n * 2 + groups * n * 2 + 8 * k + s * n * bias


def decoder_bytes(info: CheckpointInfo, dtype: str, quant_kernel: str = "auto", device: str = "cpu",
                  qvl_kernel: bool | None = None) -> int:
    """The decoder layers (norms and any float linear in the compute dtype, quantized linears packed)
    and the final norm; embeddings and head are :func:`embed_head_bytes`'."""
    dtype = compute_dtype(info, dtype)
    s = _DTYPE_SIZE[dtype]
    total, quant = 0, {}
    for name, (_, shape) in info.tensors.items():
        m = _QUANT_LINEAR.match(name)
        if m and info.qcfg is not None:
            quant[name[: -len(".qweight")]] = shape
    for name, (_, shape) in info.tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in quant or "visual." in name or "embed_tokens" in name or "lm_head" in name:
            continue
        if "rotary_emb" in name:
            continue
        total += _numel(shape) * s
    q = info.qcfg
    for prefix, shape in quant.items():
        k = shape[0] if q.method == "awq" else shape[0] * 32 // q.bits
        n = shape[1] * 8 if q.method == "awq" else shape[1]
        group = q.group_for(k)
        kernel = _kernel_for(q.bits, n, k, group, dtype, device, quant_kernel, qvl_kernel)
        total += quant_linear_bytes(q.bits, n, k, group, dtype, kernel, prefix + ".bias" in info.tensors, q.desc_act)
    return total


def embed_head_bytes(info: CheckpointInfo, dtype: str, head: str = "checkpoint", quant_kernel: str = "auto",
                     device: str = "cpu", qvl_kernel: bool | None = None) -> int:
    """Token embeddings plus the output head, as ``head`` holds it (``qvl.runtime.head``). With tied
    embeddings and a quantized head in a CPU kernel's layout the lookup reads the head's rows: the
    head alone; in torch's int4pack layout the float table stays beside it. Untied, the table stays."""
    t = info.cfg.text
    dtype = compute_dtype(info, dtype)
    table = t.vocab_size * t.hidden_size * _DTYPE_SIZE[dtype]
    if head == "checkpoint":
        return table if info.cfg.tie_word_embeddings else 2 * table
    bits, group = (8, t.hidden_size) if head == "int8" else (4, 128 if t.hidden_size % 128 == 0 else t.hidden_size)
    kernel = _kernel_for(bits, t.vocab_size, t.hidden_size, group, dtype, device, quant_kernel, qvl_kernel)
    quantized = quant_linear_bytes(bits, t.vocab_size, t.hidden_size, group, dtype, kernel, False)
    shared = info.cfg.tie_word_embeddings and kernel in ("qvl", "qvl-a8")
    return quantized if shared else table + quantized


def kv_bytes_per_token(info: CheckpointInfo, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """KV-cache bytes one position of one slot takes over all layers (``KVCache.bytes_for``): k and v
    in the compute dtype, or with ``kv_cache_dtype="int8"`` int8 codes and one fp16 scale a row."""
    t = info.cfg.text
    rows = 2 * t.num_hidden_layers * t.num_key_value_heads
    if kv_cache_dtype == "int8":
        return rows * (t.head_dim + 2)
    return rows * t.head_dim * _DTYPE_SIZE[compute_dtype(info, dtype)]


def vision_call_bytes(info: CheckpointInfo, dtype: str, patches: int, vision_quant: str = "none") -> int:
    """The vision tower's activation peak for one call over ``patches`` patches (all its images or
    frame pairs together), the float32 pixel rows it reads excluded (:func:`request_bytes`); an int8
    tower adds one block of its largest linear dequantized for the call (``DEQUANT_BLOCK_BYTES`` at
    most, or the whole weight where it is smaller)."""
    if patches <= 0:
        return 0
    s = _DTYPE_SIZE[compute_dtype(info, dtype)]
    dense = 0
    if vision_quant == "int8":
        dense = min(DEQUANT_BLOCK_BYTES, max((_numel(shape) for name, (_, shape) in info.visual().items()
                                              if len(shape) == 2 and name.endswith(".weight")), default=0) * s)
    return int(patches * VISION_UNITS * info.cfg.vision.embed_dim * s + VISION_FIXED) + dense


def patches_for_pixels(info: CheckpointInfo, pixels: int) -> int:
    return pixels // info.cfg.vision.patch_size**2


def prefill_dense_bytes(info: CheckpointInfo, dtype: str, kernel: str = "qvl") -> int:
    """Float weight a quantized decoder's prefill chunk holds dequantized at once, by the kernel its
    largest linears (gate / up and down: intermediate x hidden) run in: qvl's CPU kernels one block of
    about ``DEQUANT_BLOCK_BYTES`` (``qvl.quant.linear.QuantLinear.dense_into``; a whole tile of rows
    where that is more), the dequant fallback the whole weight in fp32 and its cast, torch's int4
    kernel none; 0 for a float decoder."""
    if info.qcfg is None:
        return 0
    t = info.cfg.text
    s = _DTYPE_SIZE[compute_dtype(info, dtype)]
    if kernel in ("qvl", "qvl-a8"):  # qvl.quant.linear.dense_block_rows: even blocks of whole row tiles
        tile = 64 if kernel == "qvl-a8" else 4
        blocks = []
        for n, k in ((t.intermediate_size, t.hidden_size), (t.hidden_size, t.intermediate_size)):
            rows = DEQUANT_BLOCK_BYTES // (k * s)
            rows = min(n, max(tile, rows - rows % tile))
            even = -(-n // -(-n // rows))
            blocks.append(min(n, -(-even // tile) * tile) * k * s)
        return max(blocks)
    if kernel == "dequant":  # fp32, then cast to the compute dtype where that is narrower
        return t.intermediate_size * t.hidden_size * (4 + (s if s != 4 else 0))
    return 0


def decoder_kernel(info: CheckpointInfo, dtype: str, quant_kernel: str = "auto", device: str = "cpu",
                   qvl_kernel: bool | None = None) -> str:
    """The kernel the decoder's largest quantized linear (gate / up) runs in ("" for a float decoder)."""
    if info.qcfg is None:
        return ""
    t = info.cfg.text
    return _kernel_for(info.qcfg.bits, t.intermediate_size, t.hidden_size, info.qcfg.group_for(t.hidden_size),
                       compute_dtype(info, dtype), device, quant_kernel, qvl_kernel)


def prefill_bytes(info: CheckpointInfo, dtype: str, seq_len: int, chunk: int, kv_cache_dtype: str = "auto",
                  batch: int = 1, kernel: str = "qvl") -> int:
    """A prefill chunk's working set at the end of a ``seq_len`` context: layer activations, the
    attention scores when SDPA runs unfused (a mask: every chunk after the first), the dense decoder
    weight a quantized ``kernel`` holds for the GEMM (:func:`prefill_dense_bytes`), the logits row,
    and with an int8 KV cache one layer's rows dequantized for attention (every slot's, in a decode
    step)."""
    t = info.cfg.text
    s = _DTYPE_SIZE[compute_dtype(info, dtype)]
    c = min(chunk, seq_len)
    acts = c * (3 * t.intermediate_size + 6 * t.hidden_size) * s
    scores = 2 * c * t.num_attention_heads * seq_len * 4
    dense = prefill_dense_bytes(info, dtype, kernel)
    kv = 2 * batch * t.num_key_value_heads * seq_len * t.head_dim * (s + 4) if kv_cache_dtype == "int8" else 0
    return acts + scores + dense + kv + t.vocab_size * 4 * 2


def request_bytes(info: CheckpointInfo, dtype: str, seq_len: int, chunk: int, pixels: int,
                  kv_cache_dtype: str = "auto", batch: int = 1, vision_quant: str = "none",
                  kernel: str = "qvl") -> tuple[int, int]:
    """(held, peak-work) of one request: pixel rows + prompt embeddings + M-RoPE ids, and the larger
    of its vision call and a prefill chunk (they run one after the other); ``kernel``: the
    decoder's (:func:`decoder_kernel`)."""
    s = _DTYPE_SIZE[compute_dtype(info, dtype)]
    patches = patches_for_pixels(info, pixels)
    held = patches * PATCH_VALUES * 4 + seq_len * (info.cfg.text.hidden_size * s + 3 * 8 + 8)
    return held, max(vision_call_bytes(info, dtype, patches, vision_quant),
                     prefill_bytes(info, dtype, seq_len, chunk, kv_cache_dtype, batch, kernel))
