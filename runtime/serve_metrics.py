"""The server's counters and their Prometheus text exposition (format 0.0.4), without a client library.

Safe from any thread: the event loop records outcomes, the request threads record tokens.
Queue depth and slots in use are read from the engine (``Engine.state()``) at scrape time.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("stop", "length", "cancelled", "timeout", "error", "busy", "invalid")
RATE_WINDOW_S = 10


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for bound, n in zip(self.buckets, self.counts):
            acc += n
            out.append(f'{name}_bucket{{le="{bound}"}} {acc}')
        total = acc + self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.outcomes = collections.Counter({k: 0 for k in OUTCOMES})
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.running = 0
        self._per_second: collections.deque[list] = collections.deque()  # [second, tokens]

    def request_started(self) -> None:
        with self._lock:
            self.running += 1

    def request_ended(self, outcome: str, latency_s: float | None = None, prompt_tokens: int = 0) -> None:
        with self._lock:
            self.running -= 1
            self.outcomes[outcome] += 1
            self.prompt_tokens += prompt_tokens
            if latency_s is not None:
                self.latency.observe(latency_s)

    def refused(self, outcome: str) -> None:
        """A request answered with an error before it ran (bad input, busy, auth)."""
        with self._lock:
            self.outcomes[outcome] += 1

    def first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)

    def token(self, n: int = 1) -> None:
        now = int(time.monotonic())
        with self._lock:
            self.generation_tokens += n
            if self._per_second and self._per_second[-1][0] == now:
                self._per_second[-1][1] += n
            else:
                self._per_second.append([now, n])
            while self._per_second and self._per_second[0][0] <= now - RATE_WINDOW_S:
                self._per_second.popleft()

    def tokens_per_s(self) -> float:
        """Generated tokens a second over the last ``RATE_WINDOW_S`` whole seconds."""
        now = int(time.monotonic())
        with self._lock:
            n = sum(c for s, c in self._per_second if now - RATE_WINDOW_S <= s < now)
        return n / RATE_WINDOW_S

    def render(self, engine_state: dict | None = None) -> str:
        """``engine_state``: ``Engine.state()`` (queue depth and slot use), with ``decode_steps``:
        ``Engine.decode_steps()`` (steps and their seconds by how many requests each carried)."""
        es = engine_state or {}
        waiting, busy, total = es.get("queue_depth", 0), es.get("slots_in_use", 0), es.get("slots_total", 0)
        rate = self.tokens_per_s()
        with self._lock:
            lines = ["# HELP qvl_requests_total Chat completion requests by outcome.",
                     "# TYPE qvl_requests_total counter"]
            lines += [f'qvl_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.outcomes.items())]
            lines += ["# HELP qvl_requests_running Requests being answered (queued or in a slot).",
                      "# TYPE qvl_requests_running gauge", f"qvl_requests_running {self.running}",
                      "# HELP qvl_queue_depth Requests waiting for a KV-cache slot.",
                      "# TYPE qvl_queue_depth gauge", f"qvl_queue_depth {waiting}",
                      "# HELP qvl_slots_in_use KV-cache slots holding a request.",
                      "# TYPE qvl_slots_in_use gauge", f"qvl_slots_in_use {busy}",
                      "# HELP qvl_slots_total KV-cache slots (max_batch).",
                      "# TYPE qvl_slots_total gauge", f"qvl_slots_total {total}",
                      "# HELP qvl_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE qvl_prompt_tokens_total counter", f"qvl_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP qvl_generation_tokens_total Generated tokens.",
                      "# TYPE qvl_generation_tokens_total counter",
                      f"qvl_generation_tokens_total {self.generation_tokens}",
                      f"# HELP qvl_generation_tokens_per_second Generated tokens a second, last {RATE_WINDOW_S} s.",
                      "# TYPE qvl_generation_tokens_per_second gauge",
                      f"qvl_generation_tokens_per_second {rate:.3f}",
                      "# HELP qvl_time_to_first_token_seconds Request received -> first token.",
                      "# TYPE qvl_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("qvl_time_to_first_token_seconds")
            lines += ["# HELP qvl_request_latency_seconds Request received -> last token.",
                      "# TYPE qvl_request_latency_seconds histogram"]
            lines += self.latency.lines("qvl_request_latency_seconds")
        steps = es.get("decode_steps") or {}
        if steps:  # batch occupancy: how full the decode steps ran, and what each size cost
            lines += ["# HELP qvl_decode_steps_total Decode steps by the requests they carried.",
                      "# TYPE qvl_decode_steps_total counter"]
            lines += [f'qvl_decode_steps_total{{rows="{k}"}} {n}' for k, (n, _) in sorted(steps.items())]
            lines += ["# HELP qvl_decode_step_seconds_total Time in decode steps by the requests they carried.",
                      "# TYPE qvl_decode_step_seconds_total counter"]
            lines += [f'qvl_decode_step_seconds_total{{rows="{k}"}} {t:.6f}' for k, (_, t) in sorted(steps.items())]
        return "\n".join(lines) + "\n"
