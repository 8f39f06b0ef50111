"""Public API: ``qvl.load(path, **LoadOptions) -> Engine`` with ``submit``, ``generate``, ``stream``,
``score`` and ``text_logprobs``, safe to call from many threads at once."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from qvl.model.kv_cache import check_kv_cache_dtype
from qvl.quant import cpu as cpu_kernel
from qvl.runtime.core import EngineCore
from qvl.runtime.errors import MemoryBudgetError, PromptTooLongError, QueueFullError
from qvl.runtime.fetch import FetchPolicy
from qvl.runtime.head import check_head, quantize_head
from qvl.runtime.inputs import InputLimits
from qvl.runtime.loader import check_device, load_model, read_config, read_json_object
from qvl.runtime.onnx_vision import OnnxVision
from qvl.runtime.options import LoadOptions
from qvl.runtime.plan import check_pictures, make_plan, pin_allocator, read_checkpoint
from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig
from qvl.runtime.prompt import Request, build_request
from qvl.runtime.runner import ModelRunner
from qvl.runtime.sampler import SamplingParams
from qvl.runtime.scheduler import Scheduler
from qvl.runtime.sequence import Handle, Sequence, Stats
from qvl.runtime.session import Session
from qvl.runtime.tokenizer import Tokenizer
from qvl.runtime.video_processor import VideoProcessor, VideoProcessorConfig
from qvl.runtime.vision_quant import check_vision_quant

log = logging.getLogger(__name__)


def _stop_ids(path: Path, tokenizer: Tokenizer) -> set[int]:
    """eos ids of generation_config.json, else config.json, else the chat end token."""
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.exists():
            eos = read_json_object(f).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {int(eos)}
    return {tokenizer.token_id("<|im_end|>")}


class Engine:
    """A loaded model and the loop that serves it. Every method may be called from any thread
    at once: requests share the KV cache's slots and decode together (``qvl.runtime.core``)."""

    def __init__(self, path, **options):
        opts = self.options = LoadOptions(**options)
        path = Path(path)
        t0 = time.perf_counter()
        self.device = check_device(opts.device)
        self.plan = None
        if opts.memory_budget is not None:  # before anything is allocated: what does not fit fails here
            opts = self.options = self._apply_plan(path, opts, options)
        if opts.vision_backend not in ("torch", "onnx"):
            raise ValueError(f"vision_backend {opts.vision_backend!r}: use 'torch' or 'onnx'")
        self.vision = None  # None: the model's own torch tower
        if opts.vision_backend == "onnx":  # checked before the weights load: a wrong file fails fast
            merge = read_config(path)[0].vision.spatial_merge_size
            self.vision = OnnxVision.from_checkpoint(path, merge)
        check_head(opts.head)
        check_vision_quant(opts.vision_quant)
        if opts.vision_quant != "none" and self.vision is not None:
            raise ValueError("vision_quant applies to the torch tower; an ONNX tower's precision is set when it "
                             "is exported (`qvl export onnx --vision-quant int8`)")
        kv_dtype = check_kv_cache_dtype(opts.kv_cache_dtype)
        self.model = load_model(path, dtype=opts.dtype, device=self.device, vision=self.vision is None,
                                quant_kernel=opts.quant_kernel, vision_quant=opts.vision_quant)
        quantize_head(self.model, opts.head, opts.quant_kernel)
        self.dtype = self.model.embed_tokens.weight.dtype
        self.model.setup_caches(opts.max_batch, opts.max_seq_len, kv_dtype or self.dtype, self.device)
        self.tokenizer = Tokenizer.from_dir(path)
        self.processor = ImageProcessor(ImageProcessorConfig.from_dir(path))
        self.video_processor = VideoProcessor(VideoProcessorConfig.from_dir(path))
        self.fetch_policy = FetchPolicy.from_env(opts.allow_remote, opts.allow_private_addresses)
        self.limits = InputLimits(opts.max_image_pixels, opts.max_decode_pixels, opts.max_vision_tokens,
                                  self.plan.max_pixels if self.plan is not None else None)
        self.stop_ids = _stop_ids(path, self.tokenizer)
        cfg = self.model.cfg
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id
        for name in ("prefix_cache_mb", "vision_cache_mb"):
            if not getattr(opts, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(opts, name)!r}")
        runner = ModelRunner(self.model, self.vision, self.image_token_id, self.video_token_id, self.device,
                             opts.prefill_chunk, opts.decode_kv, opts.cuda_graphs,
                             int(opts.prefix_cache_mb * 2**20), int(opts.vision_cache_mb * 2**20),
                             self.plan.max_call_patches if self.plan is not None else None)
        self._core = EngineCore(runner, Scheduler(opts.max_batch, opts.max_queue), self.tokenizer)
        weakref.finalize(self, self._core.stop)
        self.load_s = time.perf_counter() - t0
        self.last_stats = Stats()
        log.info("qvl engine ready in %.2fs (max_seq_len=%d, max_batch=%d)", self.load_s, opts.max_seq_len,
                 opts.max_batch)

    def _apply_plan(self, path: Path, opts: LoadOptions, given: dict) -> LoadOptions:
        """``opts`` with what ``memory_budget`` allows for the options the caller left out; a
        ``MemoryBudgetError`` naming the part when nothing fits (``qvl.runtime.plan``)."""
        chosen = ("max_seq_len", "max_batch", "prefix_cache_mb", "vision_cache_mb")
        plan = make_plan(read_checkpoint(path), opts.memory_budget, dtype=opts.dtype, head=opts.head,
                         quant_kernel=opts.quant_kernel, device=self.device.type, vision_backend=opts.vision_backend,
                         prefill_chunk=opts.prefill_chunk, max_image_pixels=opts.max_image_pixels,
                         vision_quant=opts.vision_quant, kv_cache_dtype=opts.kv_cache_dtype,
                         qvl_kernel=self.device.type == "cpu" and cpu_kernel.isa() is not None,
                         **{k: getattr(opts, k) for k in chosen if k in given})
        if not plan.fits:
            raise MemoryBudgetError(f"{path} does not fit memory_budget={opts.memory_budget!r}: {plan.refusal}")
        pin_allocator()
        self.plan = plan
        log.info("memory plan: %s", plan.describe().replace("\n", "; "))
        return dataclasses.replace(opts, max_seq_len=plan.max_seq_len, max_batch=plan.max_batch,
                                   prefix_cache_mb=plan.prefix_cache_mb, vision_cache_mb=plan.vision_cache_mb)

    def state(self) -> dict:
        """What a health check or metrics endpoint reports: ``running``, ``queue_depth``,
        ``slots_in_use``, ``slots_total``."""
        return {"running": self._core.running, **self._core.scheduler.state()}

    def decode_steps(self, reset: bool = False) -> dict[int, tuple[int, float]]:
        """Decode steps run so far by batch occupancy, ``{rows: (steps, seconds)}``
        (``EngineCore.decode_steps``); ``reset`` starts the count again."""
        return self._core.decode_steps(reset)

    def session(self, system: str | None = None, **kw) -> Session:
        """A conversation or a loop over frames whose instructions stay cached (``qvl.runtime.session``)."""
        return Session(self, system, **kw)

    def close(self) -> None:
        """Stop the engine loop; running requests end with an error."""
        self._core.stop()

    def _request(self, messages, add_vision_id: bool) -> Request:
        merge = self.model.cfg.vision.spatial_merge_size
        req = build_request(messages, self.tokenizer, self.processor, merge, add_vision_id, self.video_processor,
                            self.fetch_policy, self.limits, self.model.max_seq)
        if self.plan is not None:
            check_pictures(self.plan, req.grids, [v.grid for v in req.videos])
        return req

    def submit(self, messages, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
               seed=None, stop=(), add_vision_id=False, ignore_eos=False) -> Handle:
        """Queue one conversation; returns its ``Handle`` at once (iterate it, ``.result()``,
        ``.cancel()``, ``.stats``). Messages are read, fetched and preprocessed here, in the
        caller's thread, so a bad input raises here and never reaches the loop. ``stop``: strings
        that end the answer (not included in its text). Raises ``QueueFullError`` when every slot
        is busy and ``max_queue`` requests wait, before any input is read. ``max_new_tokens=None``:
        as many as the KV cache has room for after the prompt."""
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                           or not isinstance(max_new_tokens, numbers.Integral)):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = (stop,) if isinstance(stop, str) else () if stop is None else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        self._core.scheduler.check_room()  # a busy engine refuses before fetching and decoding pictures
        req = self._request(messages, add_vision_id)
        max_seq = self.model.max_seq
        self._check_fits(len(req.ids) + 1, "prompt", len(req.ids))  # room for the first new token
        if max_new_tokens is None:
            max_new_tokens = max_seq - len(req.ids)
        elif len(req.ids) + max_new_tokens > max_seq:
            log.warning("max_new_tokens=%d cut to %d to fit max_seq_len=%d", max_new_tokens, max_seq - len(req.ids),
                        max_seq)
            max_new_tokens = max_seq - len(req.ids)
        seq = Sequence(req, sampling, max_new_tokens, frozenset(self.stop_ids), tuple(stop), ignore_eos)
        return self._submit(seq)

    def _check_fits(self, need: int, what: str, tokens: int | None = None) -> None:
        """``PromptTooLongError`` when ``need`` positions exceed the KV cache (``tokens``: the count
        to name, when it is not ``need``)."""
        if need > self.model.max_seq:
            raise PromptTooLongError(f"{what} of {need if tokens is None else tokens} tokens does not fit the KV "
                                     f"cache (max_seq_len={self.model.max_seq}); load with a larger max_seq_len "
                                     "or shrink the images (max_pixels)")

    def _submit(self, seq: Sequence) -> Handle:
        self._core.submit(seq)
        return Handle(seq, self._core.wake)

    def _run_all(self, messages, max_new_tokens, kw, collect):
        """Submit one conversation or each of a list, side by side; ``collect(handle)`` each answer.

        A list longer than the free slots and the queue waits for its own earlier answers instead
        of failing; an error about one conversation of a list names it."""
        single = _is_single(messages)
        convs = [messages] if single else list(messages)
        handles: list[Handle] = []
        waited = 0
        try:
            for i, conv in enumerate(convs):
                while True:
                    try:
                        handles.append(self.submit(conv, max_new_tokens, **kw))
                        break
                    except QueueFullError:
                        if waited == len(handles):
                            raise
                        handles[waited].result()
                        waited += 1
                    except ValueError as e:
                        if single:
                            raise
                        raise type(e)(f"conversation {i}: {e}") from e
            out = [collect(h) for h in handles]
        finally:
            for h in handles:
                h.cancel()
        self.last_stats = Stats.combine([h.stats for h in handles])
        return out[0] if single else out

    def generate_ids(self, messages, max_new_tokens=128, **kw):
        """Like ``generate`` but returns the new token ids per conversation (stop token included)."""
        return self._run_all(messages, max_new_tokens, kw, Handle.result)

    def generate(self, messages, max_new_tokens=128, **kw):
        """One conversation -> str; a list of conversations -> list[str] (decoded side by side)."""
        if kw.get("stop"):  # the streamed text is what the stop strings cut
            return self._run_all(messages, max_new_tokens, kw, lambda h: "".join(h.text()))
        return self._run_all(messages, max_new_tokens, kw, lambda h: self.tokenizer.decode(h.result()))

    def stream(self, messages, max_new_tokens=128, **kw) -> Iterator[str]:
        """Yield text pieces of one conversation's answer as they are decoded. Closing or dropping
        the generator cancels the request and frees its slot."""
        if not _is_single(messages):
            raise ValueError("stream() takes one conversation (a list of message dicts)")
        h = self.submit(messages, max_new_tokens, **kw)
        try:
            yield from h.text()
        finally:
            h.cancel()
        self.last_stats = h.stats

    def score(self, messages, answer_ids, add_vision_id=False) -> torch.Tensor:
        """Teacher-forced log-probabilities [len(answer_ids), vocab] (float32, on the CPU).

        Row i is the model's distribution for the token after the prompt and ``answer_ids[:i]``.
        The answer runs through the same prefill and cached decode steps as ``generate``, so for
        the ids greedy decoding produced, every row's argmax is the token it chose.
        """
        if not _is_single(messages):
            raise ValueError("score() takes one conversation (a list of message dicts)")
        answer_ids = [int(i) for i in answer_ids]
        if not answer_ids:
            raise ValueError("score() needs at least one answer token")
        req = self._request(messages, add_vision_id)
        self._check_fits(len(req.ids) + len(answer_ids), "prompt + answer")
        seq = Sequence(req, SamplingParams(), len(answer_ids), frozenset(), ignore_eos=True, forced=answer_ids)
        self._submit(seq).result()
        return torch.stack(seq.rows)

    def text_logprobs(self, messages, answer_ids=(), add_vision_id=False) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probabilities [N, vocab] (float32, CPU) for every text token of the
        templated prompt and ``answer_ids`` that follows another token, and those N target ids.

        ``score`` covers the answer only (a few tokens a question); these rows take in the whole
        chat, so divergences between two models (e.g. float vs quantized) are measured on
        hundreds of positions instead of a handful.
        """
        if not _is_single(messages):
            raise ValueError("text_logprobs() takes one conversation (a list of message dicts)")
        req = self._request(messages, add_vision_id)
        req.ids = list(req.ids) + [int(i) for i in answer_ids]
        self._check_fits(len(req.ids), "prompt + answer")
        seq = Sequence(req, SamplingParams(), 1, frozenset(), prompt_logprobs=True)
        self._submit(seq).result()
        targets = seq.targets or [torch.zeros(0, dtype=torch.int64)]
        rows = seq.rows or [torch.zeros(0, self.model.cfg.text.vocab_size)]
        return torch.cat(rows), torch.cat(targets)


def _is_single(messages) -> bool:
    """A conversation is a list of dicts; a batch is a list of such lists."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of message dicts, or a list of such lists")
    return isinstance(messages[0], dict)


def load(path, **options) -> Engine:
    """Load a Qwen2-VL checkpoint directory for inference; ``options`` are ``LoadOptions``'s fields."""
    return Engine(path, **options)
