"""Conversation-state cache: a model state summarises a whole token prefix, so a request
whose prompt extends an earlier request's tokens (prompt + generated) resumes from the
saved state and feeds only the new tokens.

Entries are keyed by the exact token prefix (length and BLAKE2b hash of the int32 ids;
the ids are stored too and compared on a hit, so a hash collision can never return a
wrong state). Each entry holds the state after its tokens *and* the logits for the next
token, so a prompt that equals a cached prefix needs no model call at all. Least
recently used entries are evicted to keep the total within a byte budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from samout.state import State


def _ids_array(tokens: list[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(tokens, dtype=np.int32))


def prefix_key(tokens: list[int] | np.ndarray) -> tuple[int, bytes]:
    """(length, hash) of a whole token sequence."""
    ids = _ids_array(tokens)
    return len(ids), hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


@dataclass
class CacheEntry:
    tokens: np.ndarray  # int32 ids the state has seen
    state: State  # batch 1
    logits: Tensor  # [vocab]: the next-token logits after `tokens`

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * self.logits.element_size() + self.tokens.nbytes


class StateCache:
    """LRU of (token prefix -> state, next logits) within `budget_bytes`. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"state cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, bytes], CacheEntry] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, tokens: list[int] | np.ndarray, state: State, logits: Tensor) -> bool:
        """Store a state (cloned, so it owns its memory) for exactly `tokens`. Returns
        False when the entry alone exceeds the budget (nothing is stored then)."""
        ids = _ids_array(tokens)
        if len(ids) == 0:
            return False
        entry = CacheEntry(ids.copy(), state.clone(), logits.detach().clone().reshape(-1))
        size = entry.nbytes
        if size > self.budget_bytes:
            return False
        key = prefix_key(ids)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(key, old)
            self._entries[key] = entry
            self._lengths[key[0]] += 1
            self._bytes += size
            while self._bytes > self.budget_bytes:
                old_key, old_entry = self._entries.popitem(last=False)
                self._forget(old_key, old_entry)
                self.evictions += 1
        return True

    def _forget(self, key: tuple[int, bytes], entry: CacheEntry) -> None:
        self._bytes -= entry.nbytes
        self._lengths[key[0]] -= 1
        if not self._lengths[key[0]]:
            del self._lengths[key[0]]

    def lookup(self, tokens: list[int] | np.ndarray) -> CacheEntry | None:
        """The entry for the longest cached prefix of `tokens` (the whole of it included),
        or None. One pass over the ids: the hash is extended up to each cached length."""
        ids = _ids_array(tokens)
        with self._lock:
            lengths = sorted(n for n in self._lengths if n <= len(ids))
            best = None
            h = hashlib.blake2b(digest_size=16)
            done = 0
            for n in lengths:
                h.update(ids[done:n].tobytes())
                done = n
                entry = self._entries.get((n, h.digest()))
                if entry is not None and np.array_equal(entry.tokens, ids[:n]):
                    best = (n, h.digest())
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            return self._entries[best]

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
