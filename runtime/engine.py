"""Public API: ``qvl.load(path, ...) -> Engine`` with ``generate`` and ``stream``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from qvl.runtime.fetch import FetchPolicy
from qvl.runtime.generate import Stats, generate_ids, sequence_logprobs
from qvl.runtime.loader import load_model, read_config
from qvl.runtime.onnx_vision import OnnxVision
from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig
from qvl.runtime.prompt import build_request
from qvl.runtime.sampler import Sampler, SamplingParams
from qvl.runtime.tokenizer import Tokenizer
from qvl.runtime.video_processor import VideoProcessor, VideoProcessorConfig

log = logging.getLogger(__name__)


def _stop_ids(path: Path, tokenizer: Tokenizer) -> set[int]:
    """eos ids of generation_config.json, else config.json, else the chat end token."""
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {int(eos)}
    return {tokenizer.token_id("<|im_end|>")}


class Engine:
    def __init__(self, path, device="cpu", dtype="float32", max_seq_len=4096, max_batch=1, allow_remote=None,
                 vision_backend="torch", quant_kernel="auto"):
        path = Path(path)
        t0 = time.perf_counter()
        self.device = torch.device(device)
        if vision_backend not in ("torch", "onnx"):
            raise ValueError(f"vision_backend {vision_backend!r}: use 'torch' or 'onnx'")
        self.vision = None  # None: the model's own torch tower
        if vision_backend == "onnx":  # checked before the weights load: a wrong file fails fast
            merge = read_config(path)[0].vision.spatial_merge_size
            self.vision = OnnxVision.from_checkpoint(path, merge)
        self.model = load_model(path, dtype=dtype, device=self.device, vision=self.vision is None,
                                quant_kernel=quant_kernel)
        self.dtype = self.model.embed_tokens.weight.dtype
        self.model.setup_caches(max_batch, max_seq_len, self.dtype, self.device)
        self.tokenizer = Tokenizer.from_dir(path)
        self.processor = ImageProcessor(ImageProcessorConfig.from_dir(path))
        self.video_processor = VideoProcessor(VideoProcessorConfig.from_dir(path))
        self.fetch_policy = FetchPolicy.from_env(allow_remote)
        self.stop_ids = _stop_ids(path, self.tokenizer)
        cfg = self.model.cfg
        self.pad_id = self._pad_id(path)
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id
        self.load_s = time.perf_counter() - t0
        self.last_stats = Stats()
        log.info("qvl engine ready in %.2fs (max_seq_len=%d, max_batch=%d)", self.load_s, max_seq_len, max_batch)

    def _pad_id(self, path: Path) -> int:
        f = path / "generation_config.json"
        if f.exists():
            pad = json.loads(f.read_text()).get("pad_token_id")
            if pad is not None:
                return int(pad)
        return min(self.stop_ids)

    def _run(self, batch, max_new_tokens, sampling: SamplingParams, add_vision_id, ignore_eos, sampler=None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        merge = self.model.cfg.vision.spatial_merge_size
        reqs = [build_request(m, self.tokenizer, self.processor, merge, add_vision_id, self.video_processor,
                              self.fetch_policy) for m in batch]
        self.last_stats = Stats()
        sampler = Sampler(sampling, self.device) if sampler is None else sampler
        return generate_ids(self.model, reqs, sampler, max_new_tokens, self.stop_ids,
                            self.pad_id, self.image_token_id, self.video_token_id, self.last_stats,
                            self.device, ignore_eos, vision=self.vision)

    def generate_ids(self, messages, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
                     repetition_penalty=1.0, seed=None, add_vision_id=False, ignore_eos=False):
        """Like ``generate`` but returns the new token ids per conversation (stop token included)."""
        single = _is_single(messages)
        batch = [messages] if single else list(messages)
        sp = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        out = [[] for _ in batch]
        done = [False] * len(batch)
        for nxt in self._run(batch, max_new_tokens, sp, add_vision_id, ignore_eos):
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(tok)
                    done[b] = (tok in self.stop_ids) and not ignore_eos
        return out[0] if single else out

    def generate(self, messages, max_new_tokens=128, **kw):
        """One conversation -> str; a list of conversations -> list[str] (run as one batch)."""
        ids = self.generate_ids(messages, max_new_tokens, **kw)
        if _is_single(messages):
            return self.tokenizer.decode(ids)
        return [self.tokenizer.decode(x) for x in ids]

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
        forced = _ForcedTokens(answer_ids, self.device)
        for _ in self._run([messages], len(answer_ids), SamplingParams(), add_vision_id, True, sampler=forced):
            pass
        return torch.stack(forced.rows)

    def text_logprobs(self, messages, answer_ids=(), add_vision_id=False) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probabilities [N, vocab] (float32, CPU) for every text token of the
        templated prompt and ``answer_ids`` that follows another token, and those N target ids.

        ``score`` covers the answer only (a few tokens a question); these rows take in the whole
        chat, so divergences between two models (e.g. float vs quantized) are measured on
        hundreds of positions instead of a handful.
        """
        if not _is_single(messages):
            raise ValueError("text_logprobs() takes one conversation (a list of message dicts)")
        merge = self.model.cfg.vision.spatial_merge_size
        req = build_request(messages, self.tokenizer, self.processor, merge, add_vision_id, self.video_processor,
                            self.fetch_policy)
        return sequence_logprobs(self.model, req, list(answer_ids), self.image_token_id, self.video_token_id,
                                 self.device, vision=self.vision)

    def stream(self, messages, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
               repetition_penalty=1.0, seed=None, add_vision_id=False, ignore_eos=False) -> Iterator[str]:
        """Yield text pieces of one conversation's answer as they are decoded."""
        if not _is_single(messages):
            raise ValueError("stream() takes one conversation (a list of message dicts)")
        sp = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        dec = self.tokenizer.stream_decoder()
        for nxt in self._run([messages], max_new_tokens, sp, add_vision_id, ignore_eos):
            tok = int(nxt[0])
            piece = dec.push(tok)
            if piece:
                yield piece
            if tok in self.stop_ids and not ignore_eos:
                break
        tail = dec.flush()
        if tail:
            yield tail


class _ForcedTokens:
    """Stands in for the sampler: keeps each step's log-probs and feeds the given token instead."""

    def __init__(self, ids: list[int], device):
        self.ids = torch.tensor(ids, dtype=torch.int64, device=device)
        self.rows: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        self.rows.append(torch.log_softmax(logits[0].float(), dim=-1).cpu())
        k = len(self.rows) - 1
        return self.ids[k : k + 1]


def _is_single(messages) -> bool:
    """A conversation is a list of dicts; a batch is a list of such lists."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of message dicts, or a list of such lists")
    return isinstance(messages[0], dict)


def load(path, device="cpu", dtype="float32", max_seq_len=4096, max_batch=1, allow_remote=None,
         vision_backend="torch", quant_kernel="auto") -> Engine:
    """Load a Qwen2-VL checkpoint directory for inference.

    ``dtype``: "float32", "bfloat16", "float16" or "auto" (the checkpoint's). The KV cache,
    ``[max_batch, kv_heads, max_seq_len, head_dim]`` per layer, is allocated here once.
    ``allow_remote``: fetch http(s) images/videos named in messages (default: the
    ``QVL_ALLOW_REMOTE`` env var, else off); limits in ``engine.fetch_policy``.
    ``vision_backend``: "torch", or "onnx" to run the vision tower from ``path/vision.onnx`` in
    onnxruntime (see ``qvl export onnx``); its torch weights are then not loaded.
    ``quant_kernel`` (quantized checkpoints): "auto" (fastest that runs here), "qvl" (qvl's
    AVX-512 CPU kernel), "int4pack" (torch's int4 kernel) or "dequant"; a named kernel that
    cannot run a layer is an error.
    """
    return Engine(path, device=device, dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch,
                  allow_remote=allow_remote, vision_backend=vision_backend, quant_kernel=quant_kernel)
