"""Caches that let a request skip work an earlier one did: the KV of a shared prompt prefix, and
the vision tower's output for a picture seen before.

A request's *keys* are its token ids with every image or video placeholder token replaced by
that item's digest (its preprocessed pixels and grid), so two prompts share a prefix only where
their text and their pictures are the same. ``PrefixCache`` keeps, for requests that ended, the
KV rows of their cache slot (prompt and answer, every layer) under those keys; a new request
whose keys begin with an entry's copies the shared rows into its slot and prefills only the
rest. M-RoPE positions need nothing: they follow from the whole prompt's ids and grids, so the
part after the prefix gets the positions a full prefill would give it.

Both caches are least-recently-used under a byte budget and live on the engine loop's thread.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def digest(*parts) -> bytes:
    """A 16-byte content hash of tensors (their bytes, dtype and shape) and plain values."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
        else:
            h.update(repr(p).encode())
    return h.digest()


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two lists (binary search over C-speed slice
    compares, so a 2,000-token prompt costs ~11 of them)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _per_position(cache) -> list[torch.Tensor]:
    """A layer cache's buffers indexed [slot, head, position, ...]: k and v, and an int8 cache's scales."""
    return cache.tensors() if hasattr(cache, "tensors") else [cache.k, cache.v]


@dataclass(eq=False)
class _Entry:
    keys: list
    rows: list[list[torch.Tensor]]  # per layer, each per-position buffer's [kv_heads, n, ...]
    nbytes: int


class PrefixCache:
    """KV rows of ended requests, found by the longest common prefix of keys."""

    def __init__(self, budget_bytes: int, min_tokens: int = 16):
        self.budget, self.min_tokens = int(budget_bytes), min_tokens
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._ids = 0
        self.nbytes = 0
        self.hits = self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: list) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with ``keys`` and that length (0: none)."""
        self.lookups += 1
        best, best_n = None, 0
        for eid, e in self._entries.items():
            n = common_prefix(keys, e.keys)
            if n > best_n:
                best, best_n, best_id = e, n, eid
        if best is None or best_n < self.min_tokens:
            return None, 0
        self._entries.move_to_end(best_id)
        self.hits += 1
        return best, best_n

    def store(self, keys: list, caches, row: int) -> None:
        """Keep cache row ``row``'s first ``len(keys)`` positions of every layer under ``keys``.

        An entry whose keys begin this one's is replaced (this one holds all it held); if an
        entry already holds all of ``keys``, nothing is copied.
        """
        n = len(keys)
        if n < self.min_tokens or self.budget <= 0:
            return
        for eid, e in list(self._entries.items()):
            m = common_prefix(keys, e.keys)
            if m == n:  # already held, possibly with more after it
                self._entries.move_to_end(eid)
                return
            if m == len(e.keys):
                self._drop(eid)
        nbytes = n * sum(t[row, :, 0].numel() * t.element_size() for c in caches for t in _per_position(c))
        if nbytes > self.budget:  # checked before copying: a long request must not double its KV
            return
        rows = [[t[row, :, :n].clone() for t in _per_position(c)] for c in caches]
        while self.nbytes + nbytes > self.budget:
            self._drop(next(iter(self._entries)))
        self._ids += 1
        self._entries[self._ids] = _Entry(list(keys), rows, nbytes)
        self.nbytes += nbytes

    @staticmethod
    def load(entry: _Entry, n: int, caches, row: int) -> None:
        """Copy the entry's first ``n`` positions into cache row ``row`` of every layer."""
        for c, held in zip(caches, entry.rows):
            for t, h in zip(_per_position(c), held):
                t[row, :, :n].copy_(h[:, :n])

    def _drop(self, eid: int) -> None:
        e = self._entries.pop(eid)
        self.nbytes -= e.nbytes


class VisionCache:
    """The vision tower's output per picture digest, least recently used out first."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._items: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.lookups = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> torch.Tensor | None:
        self.lookups += 1
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return t

    def put(self, key: bytes, embeds: torch.Tensor) -> None:
        nbytes = embeds.numel() * embeds.element_size()
        if nbytes > self.budget or key in self._items:
            return
        while self.nbytes + nbytes > self.budget:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._items[key] = embeds
        self.nbytes += nbytes
