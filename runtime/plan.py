"""The memory plan: what a checkpoint costs held by qvl, and what fits in a memory budget.

Torch-free, so ``qvl plan`` answers in a blink: every figure comes from the checkpoint's headers
(:mod:`qvl.runtime.footprint`, one function per part), never from the weights.

A process's peak is the sum of parts that are held at once::

    runtime   python, torch and the tokenizer, measured (RUNTIME_BYTES)
    weights   vision tower + decoder + embeddings/head, as held: the compute dtype, the quantized
              linears in their kernel's packing, the head option
    kv        kv_bytes_per_token * max_seq_len * max_batch (the static cache)
    caches    prefix_cache_mb + vision_cache_mb, counted at their full budgets
    request   one request's pixel rows and prompt embeddings, plus the larger of the vision
              tower's activations (one tower call) and a prefill chunk's working set

Each part comes from one function taking the option that changes it (``head``, ``dtype``,
``quant_kernel``, ...), so a new way of holding a part is one function's business.

The vision tower's activation peak is footprint's measured model. It holds with glibc's mmap
threshold pinned (:func:`pin_allocator`): with its default sliding threshold, freed blocks up to
32 MB stay in the heap and the same call peaks up to 2.5x higher, by an amount that depends on
what ran before.
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import asdict, dataclass, field

from qvl.runtime.errors import MemoryBudgetError
# read_checkpoint and the vision fit are re-exported: callers read a checkpoint through the plan
from qvl.runtime.footprint import (PATCH_VALUES, RUNTIME_BYTES, VISION_FIXED, VISION_UNITS,  # noqa: F401
                                   CheckpointInfo, compute_dtype, decoder_bytes, decoder_kernel, embed_head_bytes,
                                   gb, kv_bytes_per_token, parse_bytes, patches_for_pixels, read_checkpoint,
                                   request_bytes, vision_call_bytes, vision_tower_bytes)

log = logging.getLogger(__name__)

PLAN_PIXELS = 448 * 448  # the picture a plan keeps room for when none is named
MIN_SEQ_LEN = 256
SEQ_STEP = 256
DEFAULT_SEQ_LEN = 4096  # LoadOptions' default: the context chosen when it fits
MMAP_THRESHOLD = 1 << 20


def check_pictures(plan: "Plan", image_grids, video_grids) -> None:
    """Refuse (``MemoryBudgetError``) a request whose pictures the plan has no room for: an image or
    frame pair over one tower call's patches (a call cannot be cut inside one), or pixel rows (float32
    for images, the uint8 frames of videos) over those of the largest picture the plan holds."""
    units = [t * h * w for t, h, w in image_grids] + [h * w for _, h, w in video_grids]
    if units and max(units) > plan.max_call_patches:
        raise MemoryBudgetError(f"a picture of {max(units)} patches ({max(units) * 196} pixels): the vision tower's "
                                f"activations for it would pass memory_budget={gb(plan.budget_bytes)}, which has "
                                f"room for {plan.max_call_patches} patches ({plan.max_pixels} pixels) a call; ask "
                                "for fewer with max_pixels")
    held = sum(t * h * w for t, h, w in image_grids) * PATCH_VALUES * 4 + \
        sum(t * h * w for t, h, w in video_grids) * PATCH_VALUES
    room = plan.max_call_patches * PATCH_VALUES * 4
    if held > room:
        raise MemoryBudgetError(f"the request's pictures hold {held / 1e6:.0f} MB of pixels, over the "
                                f"{room / 1e6:.0f} MB memory_budget={gb(plan.budget_bytes)} leaves a request; send "
                                "fewer or smaller pictures")


def pin_allocator() -> bool:
    """Pin glibc's mmap threshold at 1 MiB, so every large tensor is its own mapping, returned to
    the OS when freed: the peaks then follow the plan (see the module doc). False off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    budget_bytes: int
    parts: dict = field(default_factory=dict)  # name -> bytes, every held part
    weights_bytes: int = 0
    kv_bytes_per_token: int = 0
    vision_peak_bytes: int = 0  # for the picture the plan keeps room for (plan_pixels)
    plan_pixels: int = 0
    max_seq_len: int = 0
    max_seq_len_limit: int = 0  # the most context that fits beside plan_pixels
    max_batch: int = 0
    max_pixels: int = 0  # the largest picture at max_seq_len x max_batch
    max_call_patches: int = 0  # patches one vision-tower call may take
    prefix_cache_mb: float = 0.0
    vision_cache_mb: float = 0.0
    total_bytes: int = 0
    fits: bool = False
    refusal: str = ""
    options: dict = field(default_factory=dict)
    decoder_kernel: str = ""  # the decoder's quantized kernel, which sets a prefill chunk's dense weight

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        p = self.parts
        lines = [f"memory budget {gb(self.budget_bytes)} ({', '.join(f'{k}={v}' for k, v in self.options.items())})",
                 "  weights, as held:"]
        lines += [f"    {name:<18} {gb(p[name])}" for name in ("vision tower", "decoder", "embeddings/head")]
        lines += [f"  runtime            {gb(p['runtime'])}",
                  f"  prefix cache       {gb(p['prefix cache'])}", f"  vision cache       {gb(p['vision cache'])}",
                  f"  KV cache           {self.kv_bytes_per_token} bytes per token per slot"
                  + (f": {gb(p['kv cache'])} for {self.max_seq_len} x {self.max_batch}" if self.fits else ""),
                  f"  vision tower peak  {gb(self.vision_peak_bytes)} for a {self.plan_pixels}-pixel picture "
                  f"({patches_str(self.plan_pixels)})"]
        if not self.fits:
            return "\n".join(lines + [f"does not fit: {self.refusal}"])
        lines += [f"fits: max_seq_len {self.max_seq_len} x max_batch {self.max_batch} "
                  f"(up to {self.max_seq_len_limit} tokens fit beside the picture), largest picture "
                  f"{self.max_pixels} pixels (~{int(math.sqrt(self.max_pixels))}^2), planned peak {gb(self.total_bytes)}"]
        return "\n".join(lines)


def patches_str(pixels: int) -> str:
    return f"{pixels // 196} patches"


def make_plan(info: CheckpointInfo, budget, *, dtype: str = "float32", head: str = "checkpoint",
              quant_kernel: str = "auto", device: str = "cpu", vision_backend: str = "torch",
              prefill_chunk: int = 256, max_seq_len: int | None = None, max_batch: int | None = None,
              max_pixels: int | None = None, prefix_cache_mb: float | None = None,
              vision_cache_mb: float | None = None, max_image_pixels: int | None = None,
              vision_quant: str = "none", kv_cache_dtype: str = "auto", qvl_kernel: bool | None = None) -> Plan:
    """What fits in ``budget`` bytes. ``None`` for ``max_seq_len`` / ``max_batch`` / the cache
    sizes: the plan chooses (1 slot; 4096 tokens, or the most that fits; the caches' defaults,
    shrunk to a tenth of what is left when that is less). ``max_pixels``: the picture to keep room
    for (default 448 x 448). ``qvl_kernel``: whether qvl's CPU kernel runs here (None: guessed)."""
    budget = parse_bytes(budget)
    dtype = compute_dtype(info, dtype)
    if vision_backend != "torch":
        raise ValueError("memory_budget plans the torch vision tower; onnxruntime's own memory is not planned "
                         "(use vision_backend='torch' with a budget)")
    opts = dict(dtype=dtype, head=head, quant_kernel=quant_kernel, vision_quant=vision_quant,
                kv_cache_dtype=kv_cache_dtype, device=device)
    plan = Plan(budget, options=opts)
    batch = max_batch or 1
    pixels = max_pixels or PLAN_PIXELS
    plan.plan_pixels, plan.max_batch = pixels, batch
    kv_tok = plan.kv_bytes_per_token = kv_bytes_per_token(info, dtype, kv_cache_dtype)
    p = plan.parts
    p["vision tower"] = vision_tower_bytes(info, dtype, vision_backend, vision_quant)
    p["decoder"] = decoder_bytes(info, dtype, quant_kernel, device, qvl_kernel)
    p["embeddings/head"] = embed_head_bytes(info, dtype, head, quant_kernel, device, qvl_kernel)
    p["runtime"] = RUNTIME_BYTES
    plan.weights_bytes = p["vision tower"] + p["decoder"] + p["embeddings/head"]
    held = plan.weights_bytes + RUNTIME_BYTES
    kernel = plan.decoder_kernel = decoder_kernel(info, dtype, quant_kernel, device, qvl_kernel)
    plan.vision_peak_bytes = vision_call_bytes(info, dtype, patches_for_pixels(info, pixels), vision_quant)

    def request(seq):
        a, b = request_bytes(info, dtype, seq, prefill_chunk, pixels, kv_cache_dtype, batch, vision_quant, kernel)
        return a + b

    left = budget - held
    if left < request(MIN_SEQ_LEN) + kv_tok * MIN_SEQ_LEN * batch:
        big = max(("vision tower", "decoder", "embeddings/head", "runtime"), key=lambda k: p[k])
        plan.refusal = (f"the weights ({gb(plan.weights_bytes)}: vision tower {gb(p['vision tower'])}, decoder "
                        f"{gb(p['decoder'])}, embeddings/head {gb(p['embeddings/head'])}) and the runtime "
                        f"({gb(RUNTIME_BYTES)}) leave {gb(max(left, 0))} of {gb(budget)}, less than one "
                        f"{MIN_SEQ_LEN}-token request with a {pixels}-pixel picture needs; the largest part is the "
                        f"{big} ({gb(p[big])})")
        return _refused(plan, p)
    # caches: their defaults, or a tenth each of what is left when that is less
    caches = {}
    for name, given, default in (("prefix cache", prefix_cache_mb, 256.0), ("vision cache", vision_cache_mb, 64.0)):
        caches[name] = given if given is not None else min(default, left / 10 / 2**20)
    p["prefix cache"] = int(caches["prefix cache"] * 2**20)
    p["vision cache"] = int(caches["vision cache"] * 2**20)
    plan.prefix_cache_mb, plan.vision_cache_mb = round(caches["prefix cache"], 1), round(caches["vision cache"], 1)
    left -= p["prefix cache"] + p["vision cache"]

    def fits(seq, px=pixels):
        a, b = request_bytes(info, dtype, seq, prefill_chunk, px, kv_cache_dtype, batch, vision_quant, kernel)
        return kv_tok * seq * batch + a + b <= left

    limit = max(info.cfg.text.max_position_embeddings, max_seq_len or 0)
    seq_limit = 0
    for seq in range(MIN_SEQ_LEN, limit + 1, SEQ_STEP):  # cost grows with seq: the last that fits
        if not fits(seq):
            break
        seq_limit = seq
    if fits(limit):
        seq_limit = limit
    plan.max_seq_len_limit = seq_limit
    if seq_limit == 0:
        plan.refusal = (f"the KV cache and one request: {MIN_SEQ_LEN} tokens x {batch} slots "
                        f"({gb(kv_tok * MIN_SEQ_LEN * batch)}) with a {pixels}-pixel picture need more than the "
                        f"{gb(max(left, 0))} the weights, runtime and caches leave")
        return _refused(plan, p)
    if max_seq_len is not None:
        if not fits(max_seq_len):
            plan.refusal = (f"the KV cache: max_seq_len {max_seq_len} x max_batch {batch} "
                            f"({gb(kv_tok * max_seq_len * batch)}) with a {pixels}-pixel picture; at most "
                            f"{seq_limit} tokens fit")
            return _refused(plan, p)
        seq = max_seq_len
    else:
        seq = min(seq_limit, DEFAULT_SEQ_LEN)
    plan.max_seq_len = seq
    # the largest picture beside that context: vision cost grows with pixels, bisect on patches
    lo, hi = patches_for_pixels(info, pixels), patches_for_pixels(info, max_image_pixels or 16384 * 28 * 28)
    hi = max(lo, min(hi, (seq - 1) * info.cfg.vision.spatial_merge_size**2))  # its tokens fit the KV too
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(seq, mid * info.cfg.vision.patch_size**2):
            lo = mid
        else:
            hi = mid - 1
    plan.max_pixels = lo * info.cfg.vision.patch_size**2
    plan.max_call_patches = lo
    held_req, work = request_bytes(info, dtype, seq, prefill_chunk, pixels, kv_cache_dtype, batch, vision_quant,
                                   kernel)
    p["kv cache"] = kv_tok * seq * batch
    p["request"] = held_req + work
    plan.total_bytes = sum(p.values())
    plan.fits = True
    return plan


def peak_for(plan: Plan, info: CheckpointInfo, prompt_tokens: int, pixels: int, prefill_chunk: int = 256) -> int:
    """The planned peak of a process that ran one request of ``prompt_tokens`` with a ``pixels``
    picture (the plan's own total is for a prompt that fills max_seq_len)."""
    o = plan.options
    held, work = request_bytes(info, o["dtype"], prompt_tokens, prefill_chunk, pixels, o["kv_cache_dtype"],
                               plan.max_batch, o["vision_quant"], plan.decoder_kernel)
    return plan.total_bytes - plan.parts["request"] + held + work


def _refused(plan: Plan, parts: dict) -> Plan:
    parts.setdefault("prefix cache", 0)
    parts.setdefault("vision cache", 0)
    plan.total_bytes = sum(parts.values())
    return plan
