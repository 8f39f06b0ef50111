"""The engine loop: one thread owns the model and runs the scheduler's plan step after step.

Each turn: drop cancelled requests, admit waiting ones into free slots, run one prefill work
item of the oldest prefilling request, then one decode step for every decoding request, and
hand each new token to its request's handle. A request that fails (its vision input, its
prefill) fails alone; a decode step that raises fails the requests in it, and the loop goes on.
The loop holds no reference to the ``Engine``, so an engine that is dropped stops its thread.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from qvl.runtime.runner import ModelRunner
from qvl.runtime.scheduler import Scheduler
from qvl.runtime.sequence import Phase, Sequence
from qvl.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer):
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopping = False
        self._steps_lock = threading.Lock()
        self._steps: dict[int, list] = {}  # live rows -> [decode steps, seconds]

    def decode_steps(self, reset: bool = False) -> dict[int, tuple[int, float]]:
        """Decode steps so far by how many requests each carried: ``{rows: (steps, seconds)}``.

        A step's seconds run from its start to its last row's token chosen (sampling included; the
        detokenizing and stop checks after it are not), so ``rows * steps / seconds`` is the decode
        rate at that batch occupancy, apart from the prefill chunks that ran between steps. A step
        is counted before its tokens are handed out, so a caller that has its answer sees its steps.
        """
        with self._steps_lock:
            out = {k: (v[0], v[1]) for k, v in sorted(self._steps.items())}
            if reset:
                self._steps.clear()
        return out

    def submit(self, seq: Sequence) -> None:
        if self._stopping:
            raise RuntimeError("the engine is closed")
        self._ensure_thread()
        self.scheduler.add(seq)

    def wake(self) -> None:
        self.scheduler.wake()

    @property
    def running(self) -> bool:
        return not self._stopping

    def stop(self) -> None:
        self._stopping = True
        self.scheduler.wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qvl-engine", daemon=True)
                self._thread.start()

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self.scheduler.wait_for_work(timeout=1.0)
                try:
                    self._turn()
                except Exception as e:  # a bug in the loop itself: fail everyone, keep serving
                    log.exception("engine loop error")
                    for seq in self.scheduler.live():
                        self._fail(seq, e)
            for seq in self.scheduler.live():
                self._fail(seq, RuntimeError("the engine was closed"))

    def _turn(self) -> None:
        sch = self.scheduler
        for seq in sch.take_cancelled():
            self._finish(seq, "cancelled")
        now = time.perf_counter()
        for seq in sch.admit():
            seq.stats.queue_s = now - seq.t_submit
            seq.t_admit = now
            try:
                self.runner.start(seq)
            except Exception as e:
                self._fail(seq, e)
        seq = sch.prefilling()
        if seq is not None:
            try:
                logits = self.runner.prefill_step(seq)
            except Exception as e:
                self._fail(seq, e)
                logits = None
            if logits is not None:
                seq.phase = Phase.DECODE
                seq.stats.prefill_s = time.perf_counter() - seq.t_admit
                if seq.prompt_logprobs:
                    self._finish(seq, "stop")
                else:
                    self._accept(seq, logits)
        live = sch.decoding()  # a request whose first token was just chosen joins at once
        if not live:
            return
        t0 = time.perf_counter()
        try:
            logits = self.runner.decode(live, sch.lengths())
        except Exception as e:
            log.exception("decode step failed")
            for s in live:
                self._fail(s, e)
            return
        chosen = []
        for s in live:
            s.length += 1
            chosen.append((s, self._choose(s, logits[s.slot : s.slot + 1])))
        # counted before any of its tokens is handed out: a caller that has its last token sees the step
        with self._steps_lock:
            acc = self._steps.setdefault(len(live), [0, 0.0])
            acc[0] += 1
            acc[1] += time.perf_counter() - t0
        for s, tok in chosen:
            if tok is not None:
                self._emit(s, tok)

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> int | None:
        """``seq``'s next token from its logits row (None: sampling failed, and the request with it)."""
        try:
            return seq.choose(logits)
        except Exception as e:
            self._fail(seq, e)
            return None

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Choose ``seq``'s next token from its logits row, stream it, finish it when it ends."""
        tok = self._choose(seq, logits)
        if tok is not None:
            self._emit(seq, tok)

    def _emit(self, seq: Sequence, tok: int) -> None:
        """Stream ``tok`` as ``seq``'s next token; finish ``seq`` when it ends."""
        if not seq.out_ids:
            seq.t_first = time.perf_counter()
        seq.out_ids.append(tok)
        seq.last = tok
        seq.stats.new_tokens = len(seq.out_ids)
        if seq.detok is None:
            seq.detok = self.tokenizer.stream_decoder()
        text, hit = seq.stops.push(seq.detok.push(tok))
        seq.events.put(("token", tok, text))
        if hit:  # the text ends before the stop string: nothing after it is released
            seq.detok = None
        if seq.hit_stop_id(tok) or hit:
            self._finish(seq, "stop")
        elif len(seq.out_ids) >= seq.max_new_tokens or seq.length >= self.runner.model.max_seq:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.phase is Phase.DONE:
            return
        try:
            self.runner.retire(seq)
        except Exception:  # a cache that cannot take the rows costs a later request time, never this answer
            log.exception("keeping request %d's KV in the prefix cache failed", seq.id)
        self.scheduler.free(seq)
        if seq.detok is not None:
            text, _ = seq.stops.push(seq.detok.flush())
            tail = text + seq.stops.flush()
            if tail:
                seq.events.put(("text", tail))
        if seq.t_first:
            seq.stats.decode_s = time.perf_counter() - seq.t_first
        seq.finish_reason, seq.work, seq.detok = reason, {}, None
        seq.events.put(("done",))

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if seq.phase is Phase.DONE:
            return
        self.scheduler.free(seq)
        seq.finish_reason, seq.work, seq.detok = "error", {}, None
        seq.events.put(("error", error))
