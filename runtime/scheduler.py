"""The scheduler: who holds which KV-cache slot, who waits, who runs next.

Admission rule: between decode steps every waiting request, oldest first, takes the lowest free
slot (so live rows stay packed at the front of the cache and the decode bucket stays small).
Prefill goes one work item at a time to the oldest request still prefilling; every decoding
request then takes one step together. Requests beyond the free slots wait in a queue bounded by
``max_queue``: one more is refused at once with ``QueueFullError``.

``add``, ``check_room``, ``wake`` and ``state`` may be called from any thread; everything else runs on
the engine loop.
"""

from __future__ import annotations

import collections
import threading

from qvl.runtime.errors import QueueFullError
from qvl.runtime.sequence import Phase, Sequence


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.slots: list[Sequence | None] = [None] * max_batch
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._woken = False

    def check_room(self) -> None:
        """Raise ``QueueFullError`` when one more request would be refused (lock held or not)."""
        if len(self.waiting) - self.slots.count(None) >= self.max_queue:  # beyond what free slots take
            raise QueueFullError(f"{len(self.slots)} slots busy and {len(self.waiting)} requests waiting "
                                 f"(max_queue={self.max_queue}); retry later")

    def add(self, seq: Sequence) -> None:
        with self._cond:
            self.check_room()
            self.waiting.append(seq)
            self._woken = True
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()

    def wait_for_work(self, timeout: float | None = None) -> None:
        """Block while there is nothing to run (no slot busy, nobody waiting) and nobody woke us."""
        with self._cond:
            if not self._woken and not self.waiting and all(s is None for s in self.slots):
                self._cond.wait(timeout)
            self._woken = False

    def take_cancelled(self) -> list[Sequence]:
        """Cancelled requests, waiting or in a slot: removed from the queue (slots are freed by
        the caller through ``free`` once it has finished them)."""
        with self._cond:
            gone = [s for s in self.waiting if s.cancelled.is_set()]
            for s in gone:
                self.waiting.remove(s)
        return gone + [s for s in self.slots if s is not None and s.cancelled.is_set()]

    def admit(self) -> list[Sequence]:
        admitted = []
        with self._cond:
            while self.waiting and None in self.slots:
                seq = self.waiting.popleft()
                seq.slot = self.slots.index(None)
                seq.phase = Phase.PREFILL
                self.slots[seq.slot] = seq
                admitted.append(seq)
        return admitted

    def free(self, seq: Sequence) -> None:
        """Give back ``seq``'s slot, or its place in the queue; it never runs again."""
        with self._cond:
            if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
                self.slots[seq.slot] = None
            elif seq in self.waiting:
                self.waiting.remove(seq)
            seq.phase = Phase.DONE

    def prefilling(self) -> Sequence | None:
        pre = [s for s in self.slots if s is not None and s.phase is Phase.PREFILL]
        return min(pre, key=lambda s: s.id) if pre else None

    def decoding(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None and s.phase is Phase.DECODE]

    def lengths(self) -> list[int]:
        return [0 if s is None else s.length for s in self.slots]

    def state(self) -> dict:
        """Queue depth and slot use, read together."""
        with self._cond:
            busy = sum(s is not None for s in self.slots)
            return {"queue_depth": len(self.waiting), "slots_in_use": busy, "slots_total": len(self.slots)}

    def live(self) -> list[Sequence]:
        with self._cond:
            return [s for s in self.slots if s is not None] + list(self.waiting)
