"""Conversation states that outlive the process: a persistent tier behind the in-memory
`StateCache` (state_cache.py), on a local directory or on Redis.

    TieredStateCache(memory=StateCache(...), store=DiskStateStore(dir, budget) | RedisStateStore(url, ns))

This module holds the store interface (`StateStore`) and the tiers together; the stores are
disk_state_store.py and redis_state_store.py, and samout.serve.loading picks one from the
flags (`open_state_cache`).

The memory LRU stays in front (the fast path, and the only tier without a store). A put
goes into memory at once and is written through to the store by a writer thread of its own,
so the engine never waits on a disk or a network (a follow-up that reaches another replica
within milliseconds of the reply may miss; `flush()` waits for the writes). A lookup asks
memory first, then the store for a longer prefix than memory had (on a shared Redis another
replica may hold the conversation's latest turn); a store hit is promoted into memory.
Lookups run on the engine's thread, never on the server's event loop.

Longest-prefix lookup stays cheap in every tier: each store keeps the set of prefix lengths
it holds (the disk store in memory, rebuilt at start-up from the file names; Redis as a
sorted set per model namespace). A lookup takes the lengths between memory's hit and the
prompt, extends one BLAKE2b digest of the prompt's ids up to each (one pass over the ids),
asks which of those keys exist (Redis: one pipelined round trip), and reads the longest
that does. The bytes are state_format.py's: checksummed, never unpickled; an entry that
fails its checks is logged once, deleted, and the next shorter one is tried.

A store that fails (a Redis down, a full disk) never fails a request: the error is logged
(once per outage), counted, the lookup is a miss, and the store is left alone for
`RETRY_SECONDS` before it is tried again.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from samout.serve.state_cache import DIGEST_BYTES, CacheHit, StateCache, _ids_array, prefix_key
from samout.serve.state_format import CorruptStateError, Key, decode_state, encode_state
from samout.state import State

LOG = logging.getLogger("samout.serve.state_store")
RETRY_SECONDS = 5.0  # a failed store is skipped this long before it is tried again
# States waiting to be written (copies: a Transformer's KV cache at 4096 tokens is 32 MiB);
# beyond these a put skips the store (counted).
WRITE_QUEUE = 256
WRITE_QUEUE_BYTES = 256 << 20
MAX_CANDIDATES = 512  # longest cached lengths asked about per lookup (a bound on one round trip)


class StateStore:
    """Where states outlive the process. Keys are (length, digest); values the bytes of
    state_format.py. Methods may raise OSError or the client's errors: the caller counts them."""

    tier = "store"

    def describe(self) -> str:
        return self.tier

    def lengths(self, above: int, below: int) -> list[int]:
        """The prefix lengths n held, above < n < below (any order)."""
        raise NotImplementedError

    def existing(self, keys: list[Key]) -> list[Key]:
        """Those of `keys` that are held, in the given order."""
        raise NotImplementedError

    def read(self, key: Key) -> bytes | bytearray | None:
        """The value of `key` (a bytearray is used in place by the decoder), None if gone."""
        raise NotImplementedError

    def write(self, key: Key, data: bytes) -> None:
        raise NotImplementedError

    def discard(self, key: Key) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass



class TieredStateCache:
    """The memory LRU in front of a persistent store; the interface of `StateCache` (put,
    lookup, stats, hits, misses, nbytes), so the engine takes either. Thread-safe."""

    def __init__(self, memory: StateCache, store: StateStore, device: torch.device | str = "cpu",
                 write_queue: int = WRITE_QUEUE, write_queue_bytes: int = WRITE_QUEUE_BYTES) -> None:
        self.memory, self.store, self.device = memory, store, torch.device(device)
        self.tier_hits: Counter[str] = Counter({"memory": 0, store.tier: 0})
        self.misses = 0
        self.store_errors = self.store_skipped = self.corrupt = self.writes = 0
        self._down_until = 0.0
        self._lock = threading.Lock()  # the counters and the outage state
        self._queue: queue.Queue = queue.Queue(maxsize=write_queue)
        self._pending_bytes, self.write_queue_bytes = 0, write_queue_bytes
        self._writer = threading.Thread(target=self._write_loop, name="samout-state-writer", daemon=True)
        self._writer.start()
        self._closed = False

    # -- what the engine and the metrics read ---------------------------------------------
    @property
    def hits(self) -> int:
        return sum(self.tier_hits.values())

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes

    @property
    def budget_bytes(self) -> int:
        return self.memory.budget_bytes

    def __len__(self) -> int:
        return len(self.memory)

    def stats(self) -> dict[str, Any]:
        stats = self.memory.stats()
        stats.update(hits=self.hits, misses=self.misses, tier_hits=dict(self.tier_hits),
                     store={"kind": self.store.tier, "errors": self.store_errors, "corrupt": self.corrupt,
                            "skipped": self.store_skipped, "writes": self.writes,
                            "pending": self._queue.qsize(), **self.store.stats()})
        return stats

    # -- guarded store calls --------------------------------------------------------------
    def _call(self, fn: Callable, *args, default=None):
        """`fn(*args)`, or `default` when the store fails or is resting after a failure."""
        if time.monotonic() < self._down_until:
            with self._lock:
                self.store_skipped += 1
            return default
        try:
            result = fn(*args)
        except Exception as err:  # the store's errors (OSError, redis.RedisError, ...) never fail a request
            with self._lock:
                self.store_errors += 1
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + RETRY_SECONDS
            if first:
                LOG.warning("state store %s failed: %s: %s; serving from memory, retrying every %.0f s",
                            self.store.describe(), type(err).__name__, err, RETRY_SECONDS)
            return default
        if self._down_until:
            with self._lock:
                if self._down_until:
                    self._down_until = 0.0
                    LOG.warning("state store %s is back", self.store.describe())
        return result

    # -- put --------------------------------------------------------------------------------
    def put(self, tokens: list[int] | np.ndarray, state: State) -> bool:
        """Into memory now, into the store by the writer thread (skipped, and counted, when
        its queue is full or the store is resting after a failure)."""
        ids = _ids_array(tokens)
        stored = self.memory.put(ids, state)
        if len(ids) == 0 or self._closed:
            return stored
        if time.monotonic() < self._down_until:
            with self._lock:
                self.store_skipped += 1
            return stored
        # A plain copy now (the engine goes on with `state`); the bytes and their checksum are
        # made on the writer thread: encoding a 32 MiB KV cache here delayed the first token.
        size = state.nbytes
        with self._lock:
            full = self._pending_bytes + size > self.write_queue_bytes
            if full:
                self.store_skipped += 1
            else:
                self._pending_bytes += size
        if full:
            return stored
        try:
            self._queue.put_nowait((prefix_key(ids), state.clone(), size))
        except queue.Full:
            with self._lock:
                self.store_skipped += 1
                self._pending_bytes -= size
        return stored

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, state, size = item
                try:
                    data = encode_state(key, state)
                except Exception as err:  # e.g. a dtype this format cannot hold: memory only
                    with self._lock:
                        self.store_errors += 1
                    LOG.warning("state not stored: %s: %s", type(err).__name__, err)
                    continue
                finally:
                    del state
                    with self._lock:
                        self._pending_bytes -= size
                if self._call(self.store.write, key, data, default=False) is not False:
                    with self._lock:
                        self.writes += 1
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every state put so far is written (or given up)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is pending, stop the writer, let go of the store."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        try:
            self.store.close()
        except Exception:  # closing a broken connection: nothing left to save
            pass

    # -- lookup -----------------------------------------------------------------------------
    def lookup(self, tokens: list[int] | np.ndarray) -> CacheHit | None:
        """The longest proper prefix of `tokens` held in memory or in the store (a copy of
        its state on this cache's device), or None."""
        ids = _ids_array(tokens)
        hit = self.memory.lookup(ids)
        floor = 0 if hit is None else hit.length
        try:
            found = self._store_lookup(ids, floor)
        except Exception as err:  # never let the store fail the engine's iteration (every request)
            with self._lock:
                self.store_errors += 1
            LOG.warning("state store %s: lookup failed: %s: %s", self.store.describe(),
                        type(err).__name__, err)
            found = None
        if found is not None:
            self.memory.put(ids[:found.length], found.state)  # promoted: the next turn is a memory hit
            with self._lock:
                self.tier_hits[self.store.tier] += 1
            return found
        with self._lock:
            if hit is None:
                self.misses += 1
            else:
                self.tier_hits["memory"] += 1
        return hit

    def _store_lookup(self, ids: np.ndarray, floor: int) -> CacheHit | None:
        lengths = self._call(self.store.lengths, floor, len(ids), default=[])
        if not lengths:
            return None
        lengths = sorted(lengths)[-MAX_CANDIDATES:]
        keys = candidate_keys(ids, lengths)[::-1]  # longest first
        for key in self._call(self.store.existing, keys, default=[]):
            data = self._call(self.store.read, key)
            if data is None:
                continue
            try:
                state = decode_state(data, key, self.device)
            except CorruptStateError as err:
                with self._lock:
                    self.corrupt += 1
                LOG.warning("state store %s: the entry for a %d-token prefix is unusable (%s); deleted",
                            self.store.describe(), key[0], err)
                self._call(self.store.discard, key)
                continue
            return CacheHit(key[0], state)
        return None


def candidate_keys(ids: np.ndarray, lengths: list[int]) -> list[Key]:
    """(n, digest of ids[:n]) for each n of the ascending `lengths`: one pass over the ids."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    keys, done = [], 0
    for n in lengths:
        h.update(ids[done:n].tobytes())
        done = n
        keys.append((n, h.digest()))
    return keys
