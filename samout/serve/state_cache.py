"""Conversation-state cache: a model state summarises a whole token prefix, so a request
whose prompt extends an earlier request's tokens (prompt + generated) resumes from the
saved state and feeds only the new tokens.

An entry is the state alone, packed into one contiguous tensor: a conversation the cache
holds costs its state (4 KiB for the small preset, 36 KiB for the 85M model) plus a few
hundred bytes of bookkeeping, whatever the length of its history. In particular:
  - no token ids are kept. The key is the prefix's length and BLAKE2b-256 digest of its
    int32 ids, so a wrong state would take a BLAKE2b-256 collision. Ids would cost 4 bytes
    per token, a cost growing with the history like a (much smaller) KV cache.
  - no logits are kept (32 KiB at vocabulary 8192, 8x the small preset's state). An entry
    serves only prompts that extend it by at least one token, so the next-token logits
    always come from a model call over the new tokens.
Least recently used entries are evicted to keep the total within a byte budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samout.state import State

DIGEST_BYTES = 32  # BLAKE2b-256: the key must never collide, since no ids are kept to compare
# What an entry costs beyond its state's bytes (the packed tensor, the key, the LRU node):
# measured with glibc's mallinfo2 over 20,000 entries (tests/serve/test_state_cache.py checks it).
ENTRY_OVERHEAD_BYTES = 512

Layout = tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]  # per layer: (name, shape) per tensor


def _ids_array(tokens: list[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(tokens, dtype=np.int32))


def prefix_key(tokens: list[int] | np.ndarray) -> tuple[int, bytes]:
    """(length, digest) of a whole token sequence."""
    ids = _ids_array(tokens)
    return len(ids), hashlib.blake2b(ids.tobytes(), digest_size=DIGEST_BYTES).digest()


@dataclass(slots=True)
class CacheEntry:
    length: int  # how many tokens the state has seen
    flat: Tensor  # every tensor of the state, flattened and concatenated (one allocation)
    layout: Layout  # shared by every entry of the same shapes

    @property
    def nbytes(self) -> int:
        """What the entry costs: its state's bytes and the bookkeeping around them."""
        return self.flat.numel() * self.flat.element_size() + ENTRY_OVERHEAD_BYTES

    @property
    def state(self) -> State:
        """The state (views of the packed tensor: nothing is copied)."""
        layers, at = [], 0
        for layer in self.layout:
            tensors = {}
            for name, shape in layer:
                size = int(np.prod(shape))
                tensors[name] = self.flat[at:at + size].view(shape)
                at += size
            layers.append(tensors)
        return State(layers)


class StateCache:
    """LRU of (token prefix -> state) within `budget_bytes`. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"state cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, bytes], CacheEntry] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._layouts: dict[Layout, Layout] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, tokens: list[int] | np.ndarray, state: State) -> bool:
        """Store a copy of `state`, the state after exactly `tokens`. Returns False when the
        entry alone exceeds the budget (nothing is stored then)."""
        ids = _ids_array(tokens)
        if len(ids) == 0:
            return False
        tensors = [t for layer in state for t in layer.values()]
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            raise ValueError("a cached state's tensors must share one dtype and device")
        if state.batch_size != 1:
            raise ValueError(f"a cached state holds one sequence, got a batch of {state.batch_size}")
        state_bytes = sum(t.numel() for t in tensors) * tensors[0].element_size()
        if state_bytes + ENTRY_OVERHEAD_BYTES > self.budget_bytes:
            return False
        layout = tuple(tuple((name, tuple(t.shape)) for name, t in layer.items()) for layer in state)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])  # a copy: the entry owns it
        key = prefix_key(ids)
        with self._lock:
            entry = CacheEntry(len(ids), flat, self._layouts.setdefault(layout, layout))
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(key, old)
            self._entries[key] = entry
            self._lengths[key[0]] += 1
            self._bytes += entry.nbytes
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
        """The entry for the longest cached proper prefix of `tokens` (at least the last
        token is left to feed), or None. One pass over the ids: the digest is extended up to
        each cached length."""
        ids = _ids_array(tokens)
        with self._lock:
            lengths = sorted(n for n in self._lengths if n < len(ids))
            best = None
            h = hashlib.blake2b(digest_size=DIGEST_BYTES)
            done = 0
            for n in lengths:
                h.update(ids[done:n].tobytes())
                done = n
                key = (n, h.digest())
                if key in self._entries:
                    best = key
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            return self._entries[best]

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
