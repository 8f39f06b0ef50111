"""One request as the serving core sees it: its prompt, sampling, state in a slot, and the
handle its caller holds.

A ``Sequence`` lives on the engine loop's thread: the loop fills its slot, appends tokens and
finishes it. A ``Handle`` is the caller's side, safe from any thread: it iterates the tokens
and text pieces as they arrive, waits for the result, cancels. The two meet in a queue of
events, so no caller ever touches model state.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from qvl.runtime.prompt import Request
from qvl.runtime.sampler import Sampler, SamplingParams


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, whose KV came from the prefix cache
    new_tokens: int = 0
    queue_s: float = 0.0  # submitted -> admitted into a slot
    vision_s: float = 0.0
    prefill_s: float = 0.0  # admitted -> first token, the vision tower included
    decode_s: float = 0.0  # first token -> last token
    requests: int = 1

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        steps = max(self.new_tokens - self.requests, 0)  # each request's first token comes from prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    @classmethod
    def combine(cls, parts: list[Stats]) -> Stats:
        """One figure for requests that ran side by side: counts add up, times overlap (max)."""
        return cls(prompt_tokens=sum(p.prompt_tokens for p in parts), cached_tokens=sum(p.cached_tokens for p in parts),
                   new_tokens=sum(p.new_tokens for p in parts),
                   queue_s=max(p.queue_s for p in parts), vision_s=sum(p.vision_s for p in parts),
                   prefill_s=max(p.prefill_s for p in parts), decode_s=max(p.decode_s for p in parts),
                   requests=len(parts))


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


_ids = itertools.count()


class StopStrings:
    """Cuts the streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything decoded
        self.sent = 0  # characters released

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to release, whether a stop string was hit)."""
        start = max(self.sent - self.hold, 0)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, hit = min(hits), True
        else:
            end, hit = max(len(self.text) - self.hold, self.sent), False
        out, self.sent = self.text[self.sent : end], max(end, self.sent)
        if hit:
            self.text = self.text[:end]
        return out, hit

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass(eq=False)  # identity: the queue and the slots find a request by what it is, not its fields
class Sequence:
    """A request's state on the engine loop. ``choose`` picks each next token from [1, V] logits."""

    request: Request
    sampling: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    forced: list[int] | None = None  # teacher forcing (score): feed these, keep the log-probs
    prompt_logprobs: bool = False  # text_logprobs: log-probs over the prompt, no decoding
    id: int = field(default_factory=lambda: next(_ids))
    phase: Phase = Phase.WAITING
    slot: int = -1
    length: int = 0  # tokens in the cache row (the next write position)
    delta: int = 0  # M-RoPE: decode position = cache position + delta
    last: int = -1  # the token the next decode step feeds
    keys: list | None = None  # the prompt's prefix-cache keys (qvl.runtime.prefix_cache), set at admission
    out_ids: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # forced / prompt log-probs
    targets: list[torch.Tensor] = field(default_factory=list)  # the ids the prompt log-prob rows predict
    finish_reason: str | None = None  # stop, length, cancelled or error
    stats: Stats = field(default_factory=Stats)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_first: float = 0.0
    detok: object = None  # the streaming detokenizer, made on the loop at the first token
    # the runner's prefill state (embeddings, positions, vision work), dropped once prefilled
    work: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sampler: Sampler | None = None  # made on the loop, on the logits' device
        self.stops = StopStrings(self.stop_strings)
        self.stats.prompt_tokens = len(self.request.ids)

    def choose(self, logits: torch.Tensor) -> int:
        if self.forced is not None:
            self.rows.append(torch.log_softmax(logits[0].float(), dim=-1).cpu())
            return self.forced[len(self.out_ids)]
        if self.sampler is None:
            self.sampler = Sampler(self.sampling, logits.device)
        seen = None
        if self.sampling.repetition_penalty != 1.0:
            seen = torch.tensor([self.request.ids + self.out_ids], device=logits.device)
        return int(self.sampler(logits, seen)[0])

    def hit_stop_id(self, tok: int) -> bool:
        return tok in self.stop_ids and not self.ignore_eos


class Handle:
    """The caller's side of one request; any thread may use it.

    Iterating yields ``(token_id, text_piece)`` as tokens are decoded (``text()`` the pieces
    alone); ``result()`` waits and returns the token ids; ``cancel()`` stops the request and
    frees its slot. Dropping a handle that is still running cancels it.
    """

    def __init__(self, seq: Sequence, wake):
        self._seq, self._wake = seq, wake
        self._done = False
        self.error: BaseException | None = None

    @property
    def id(self) -> int:
        return self._seq.id

    @property
    def stats(self) -> Stats:
        return self._seq.stats

    @property
    def finish_reason(self) -> str | None:
        return self._seq.finish_reason

    def cancel(self) -> None:
        if not self._done:
            self._seq.cancelled.set()
            self._wake()

    def __iter__(self):
        while not self._done:
            kind, *payload = self._seq.events.get()
            if kind == "token":
                yield payload[0], payload[1]
            elif kind == "text":  # held-back text released at the end
                yield None, payload[0]
            else:
                self._done = True
                if kind == "error":
                    self.error = payload[0]
                    raise payload[0]

    def text(self):
        for _, piece in self:
            if piece:
                yield piece

    def result(self, timeout: float | None = None) -> list[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                kind, *payload = self._seq.events.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.id} still running after {timeout}s") from None
            if kind in ("done", "error"):
                self._done = True
                if kind == "error":
                    self.error = payload[0]
                    raise payload[0]
        if self.error is not None:
            raise self.error
        return list(self._seq.out_ids)

    def __del__(self):
        if not getattr(self, "_done", True):
            self._seq.cancelled.set()
            try:
                self._wake()
            except Exception:  # noqa: BLE001 - interpreter shutdown; the loop sees the flag anyway
                pass
