"""Conversation-state cache: a model state summarises a whole token prefix, so a request
whose prompt extends an earlier request's tokens (prompt + generated) resumes from the
saved state and feeds only the new tokens.

An entry is the state alone: a conversation the cache holds costs its state (4 KiB for the
small preset, 36 KiB for the 85M model) plus about 500 bytes of bookkeeping, whatever the
length of its history. In particular:
  - no token ids are kept. The key is the prefix's length and BLAKE2b-256 digest of its
    int32 ids, so a wrong state would take a BLAKE2b-256 collision. Ids would cost 4 bytes
    per token, a cost growing with the history like a (much smaller) KV cache.
  - no logits are kept (32 KiB at vocabulary 8192, 8x the small preset's state). An entry
    serves only prompts that extend it by at least one token, so the next-token logits
    always come from a model call over the new tokens.
  - states live in slots of anonymous memory maps of their own (`_Pool`: a few MiB each, one
    pool per state shape), not on the malloc heap. Long-lived 4 KiB blocks scattered among
    the engine's short-lived activations kept whole megabytes of freed heap from going back
    to the OS: 700 KiB of RSS per cached conversation, where the slots cost their 4 KiB.
    A map whose slots are all free is unmapped.
Least recently used entries are evicted to keep the total within a byte budget.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samout.state import State

DIGEST_BYTES = 32  # BLAKE2b-256: the key must never collide, since no ids are kept to compare
# What an entry costs beyond its state's bytes (the key, the entry, the LRU node): measured
# (tests/serve/test_state_cache.py checks it against the process's RSS).
ENTRY_OVERHEAD_BYTES = 768
MAP_BYTES = 4 << 20  # one anonymous map of a pool: pages are touched only when a slot is used

Layout = tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]  # per layer: (name, shape) per tensor


def _ids_array(tokens: list[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(tokens, dtype=np.int32))


def prefix_key(tokens: list[int] | np.ndarray) -> tuple[int, bytes]:
    """(length, digest) of a whole token sequence."""
    ids = _ids_array(tokens)
    return len(ids), hashlib.blake2b(ids.tobytes(), digest_size=DIGEST_BYTES).digest()


class _Pool:
    """Slots for the states of one layout and dtype, `per_map` to an anonymous memory map."""

    def __init__(self, layout: Layout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout, self.dtype, self.device = layout, dtype, device
        self.numel = sum(int(np.prod(shape)) for layer in layout for _, shape in layer)
        self.slot_bytes = self.numel * torch.empty(0, dtype=dtype).element_size()
        self.per_map = max(1, MAP_BYTES // self.slot_bytes)
        self.maps: dict[int, Tensor] = {}  # map id -> [per_map, numel]
        self.live: Counter[int] = Counter()
        self.free: list[tuple[int, int]] = []
        self._next = 0

    @property
    def mapped_bytes(self) -> int:
        return len(self.maps) * self.per_map * self.slot_bytes

    def take(self) -> tuple[int, int]:
        if not self.free:
            mid, self._next = self._next, self._next + 1
            if self.device.type == "cpu":
                buffer = mmap.mmap(-1, self.per_map * self.slot_bytes)  # zero pages, none touched yet
                self.maps[mid] = torch.frombuffer(buffer, dtype=self.dtype).view(self.per_map, self.numel)
            else:  # an accelerator's caching allocator has no such trouble
                self.maps[mid] = torch.empty(self.per_map, self.numel, dtype=self.dtype, device=self.device)
            self.free.extend((mid, i) for i in reversed(range(self.per_map)))
        mid, i = self.free.pop()
        self.live[mid] += 1
        return mid, i

    def release(self, mid: int, i: int) -> None:
        self.live[mid] -= 1
        if self.live[mid]:
            self.free.append((mid, i))
            return
        del self.live[mid], self.maps[mid]  # the map's last slot: unmapped (its tensor was the last user)
        self.free = [slot for slot in self.free if slot[0] != mid]

    def write(self, mid: int, i: int, state: State) -> None:
        row, at = self.maps[mid][i], 0
        for layer in state:
            for t in layer.values():
                row[at:at + t.numel()].copy_(t.reshape(-1))
                at += t.numel()

    def read(self, mid: int, i: int) -> State:
        """A copy of the state in a slot (the slot may be reused once the lock is let go)."""
        row, at, layers = self.maps[mid][i], 0, []
        for layer in self.layout:
            tensors = {}
            for name, shape in layer:
                size = int(np.prod(shape))
                tensors[name] = row[at:at + size].view(shape).clone()
                at += size
            layers.append(tensors)
        return State(layers)


@dataclass(slots=True)
class CacheEntry:
    length: int  # how many tokens the state has seen
    pool: _Pool
    slot: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """What the entry costs: its state's bytes and the bookkeeping around them."""
        return self.pool.slot_bytes + ENTRY_OVERHEAD_BYTES


@dataclass(slots=True)
class CacheHit:
    length: int  # cached tokens: the prompt's first `length` ids
    state: State  # the state after them (a copy the caller owns)


class StateCache:
    """LRU of (token prefix -> state) within `budget_bytes`. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"state cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, bytes], CacheEntry] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._pools: dict[tuple[Layout, torch.dtype, torch.device], _Pool] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the pools' memory maps (only the pages of used slots are resident)."""
        return sum(pool.mapped_bytes for pool in self._pools.values())

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
        size = sum(t.numel() for t in tensors) * tensors[0].element_size() + ENTRY_OVERHEAD_BYTES
        if size > self.budget_bytes:
            return False
        layout = tuple(tuple((name, tuple(t.shape)) for name, t in layer.items()) for layer in state)
        key = prefix_key(ids)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(key, old)
            while self._entries and self._bytes + size > self.budget_bytes:
                self._forget(*self._entries.popitem(last=False))
                self.evictions += 1
            kind = (layout, tensors[0].dtype, tensors[0].device)
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = _Pool(*kind)
            slot = pool.take()
            pool.write(*slot, state)
            self._entries[key] = CacheEntry(len(ids), pool, slot)
            self._lengths[key[0]] += 1
            self._bytes += size
        return True

    def _forget(self, key: tuple[int, bytes], entry: CacheEntry) -> None:
        self._bytes -= entry.nbytes
        self._lengths[key[0]] -= 1
        if not self._lengths[key[0]]:
            del self._lengths[key[0]]
        entry.pool.release(*entry.slot)
        if not entry.pool.maps:
            del self._pools[(entry.pool.layout, entry.pool.dtype, entry.pool.device)]

    def lookup(self, tokens: list[int] | np.ndarray) -> CacheHit | None:
        """The longest cached proper prefix of `tokens` (at least the last token is left to
        feed) and a copy of its state, or None. One pass over the ids: the digest is
        extended up to each cached length."""
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
            entry = self._entries[best]
            return CacheHit(entry.length, entry.pool.read(*entry.slot))

    def flush(self) -> None:
        """Nothing to wait for: the persistent tiers' interface (state_store.py)."""

    def close(self) -> None:
        """Nothing to let go of: the persistent tiers' interface (state_store.py)."""

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                    "mapped_bytes": self.mapped_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}
