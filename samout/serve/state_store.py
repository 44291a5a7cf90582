"""Conversation states that outlive the process: a persistent tier behind the in-memory
`StateCache` (state_cache.py), on a local directory or on Redis.

    TieredStateCache(memory=StateCache(...), store=DiskStateStore(dir, budget) | RedisStateStore(url, ns))

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

import contextlib
import hashlib
import logging
import os
import queue
import re
import stat
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from samout.errors import SamoutError
from samout.serve.state_cache import DIGEST_BYTES, CacheHit, StateCache, _ids_array, prefix_key
from samout.serve.state_format import CorruptStateError, Key, decode_state, encode_state, model_fingerprint
from samout.state import State

LOG = logging.getLogger("samout.serve.state_store")
RETRY_SECONDS = 5.0  # a failed store is skipped this long before it is tried again
# States waiting to be written (copies: a Transformer's KV cache at 4096 tokens is 32 MiB);
# beyond these a put skips the store (counted).
WRITE_QUEUE = 256
WRITE_QUEUE_BYTES = 256 << 20
MAX_CANDIDATES = 512  # longest cached lengths asked about per lookup (a bound on one round trip)
# Seconds: the Redis client's connect and socket timeouts. A lookup runs on the engine's
# thread, so a Redis that stops answering stalls decoding this long once per RETRY_SECONDS.
REDIS_TIMEOUT = 0.5
FILE_SUFFIX = ".state"
_FILE_NAME = re.compile(r"^(\d+)-([0-9a-f]{64})\.state$")


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


# -- disk ------------------------------------------------------------------------------------
def private_directory(path: str | Path) -> Path:
    """`path`, created 0700 if missing; a SamoutError when it is not a directory, belongs to
    another user, or others may write into it (their files would be served as states)."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except FileExistsError:  # a file, or a link to one
        raise SamoutError(f"{path} is not a directory") from None
    except OSError as err:
        raise SamoutError(f"cannot use {path} for states: {err.strerror or err}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SamoutError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise SamoutError(f"{path} belongs to another user (uid {info.st_uid}); give a directory of your own")
    if info.st_mode & 0o022:
        raise SamoutError(f"{path} is writable by other users; give a directory of your own "
                          f"(or chmod go-w {path})")
    return path


def file_name(key: Key) -> str:
    return f"{key[0]}-{key[1].hex()}{FILE_SUFFIX}"


class DiskStateStore(StateStore):
    """One file per state in a directory of its own, LRU within `budget_bytes`.

    Files are written under a temporary name, fsynced and renamed into place, so a crash
    leaves either the whole entry or none; the index (key -> size, in LRU order by the
    files' mtimes, which a hit refreshes) is rebuilt at start-up from the file names alone.
    One server per directory: two processes sharing one would evict each other's files
    without knowing (a file gone is a miss, never an error)."""

    tier = "disk"

    def __init__(self, directory: str | Path, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise SamoutError(f"the state directory's budget must be >= 0 bytes, got {budget_bytes}")
        self.directory = private_directory(directory)
        self.budget_bytes = budget_bytes
        self._index: OrderedDict[Key, int] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self._scan()

    def describe(self) -> str:
        return f"disk {self.directory}"

    def _scan(self) -> None:
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):  # a write cut short
                    Path(entry.path).unlink(missing_ok=True)
                    continue
                match = _FILE_NAME.match(entry.name)
                if match is None or not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
                found.append((info.st_mtime_ns, (int(match[1]), bytes.fromhex(match[2])), info.st_size))
        for _, key, size in sorted(found):
            self._add(key, size)
        self._evict()

    def _add(self, key: Key, size: int) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._bytes -= old
        else:
            self._lengths[key[0]] += 1
        self._index[key] = size
        self._bytes += size

    def _drop(self, key: Key) -> None:
        size = self._index.pop(key, None)
        if size is None:
            return
        self._bytes -= size
        self._lengths[key[0]] -= 1
        if not self._lengths[key[0]]:
            del self._lengths[key[0]]

    def _evict(self) -> None:
        while self._index and self._bytes > self.budget_bytes:
            key = next(iter(self._index))
            self._drop(key)
            self.evictions += 1
            (self.directory / file_name(key)).unlink(missing_ok=True)

    def lengths(self, above: int, below: int) -> list[int]:
        with self._lock:
            return [n for n in self._lengths if above < n < below]

    def existing(self, keys: list[Key]) -> list[Key]:
        with self._lock:
            return [k for k in keys if k in self._index]

    def read(self, key: Key) -> bytearray | None:
        path = self.directory / file_name(key)
        try:
            data = _read_writable(path)
        except FileNotFoundError:  # evicted meanwhile, or removed by hand
            with self._lock:
                self._drop(key)
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        _touch(path)  # the LRU order survives a restart
        return data

    def write(self, key: Key, data: bytes) -> None:
        if len(data) > self.budget_bytes:
            return
        path = self.directory / file_name(key)
        with self._lock:
            if key in self._index:  # the same prefix's state again: it is already there
                self._index.move_to_end(key)
                held = True
            else:
                held = False
        if held:
            _touch(path)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._add(key, len(data))
            self._evict()

    def discard(self, key: Key) -> None:
        with self._lock:
            self._drop(key)
        (self.directory / file_name(key)).unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._index), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                    "evictions": self.evictions}


def _read_writable(path: Path) -> bytearray:
    """A file's bytes in a buffer the state's tensors can use as they are (no second copy)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        got = f.readinto(data)
    return data if got == len(data) else data[:got]


def _touch(path: Path) -> None:
    """Mark a file used now; one evicted meanwhile (a race with the writer) is no error."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


# -- Redis -----------------------------------------------------------------------------------
def redacted(url: str) -> str:
    """`url` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def check_redis_url(url: str) -> None:
    """A SamoutError (one line) for a URL that is not redis://, rediss:// or unix://."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as err:
        raise SamoutError(f"--state-store: not a valid URL: {redacted(url)!r} ({err})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SamoutError(f"--state-store must be redis://HOST:PORT/DB, rediss://... or unix://PATH, "
                          f"got {redacted(url)!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise SamoutError(f"--state-store: no host in {redacted(url)!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise SamoutError(f"--state-store: the database must be a number, got {db!r}")


class RedisStateStore(StateStore):
    """States in Redis under `{namespace}{length}:{digest hex}` (the same bytes as on disk),
    with the lengths held in the sorted set `{namespace}lengths`. The namespace carries the
    model's fingerprint, so two different models never share states. `ttl_seconds`: each
    entry expires that long after it was written (None: never; Redis' maxmemory policy,
    e.g. allkeys-lru, evicts)."""

    tier = "redis"

    def __init__(self, url: str, namespace: str, ttl_seconds: int | None = None,
                 client: Any | None = None) -> None:
        check_redis_url(url)
        if ttl_seconds is not None and ttl_seconds < 1:
            raise SamoutError(f"--state-store-ttl must be at least 1 second, got {ttl_seconds}")
        import redis

        self.url, self.namespace, self.ttl = url, namespace.encode(), ttl_seconds
        self.client = client or redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                                     socket_connect_timeout=REDIS_TIMEOUT)
        self._lengths_key = self.namespace + b"lengths"

    def describe(self) -> str:
        return f"redis {redacted(self.url)}"

    def ping(self) -> None:
        self.client.ping()

    def _key(self, key: Key) -> bytes:
        return self.namespace + f"{key[0]}:{key[1].hex()}".encode()

    def lengths(self, above: int, below: int) -> list[int]:
        if below - above < 2:
            return []
        found = self.client.zrangebyscore(self._lengths_key, f"({above}", f"({below}")
        return [int(n) for n in found]

    def existing(self, keys: list[Key]) -> list[Key]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._key(key))
        return [k for k, n in zip(keys, pipe.execute()) if n]

    def read(self, key: Key) -> bytes | None:
        return self.client.get(self._key(key))

    def write(self, key: Key, data: bytes) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._key(key), data, ex=self.ttl)
        pipe.zadd(self._lengths_key, {str(key[0]): key[0]})
        pipe.execute()

    def discard(self, key: Key) -> None:
        self.client.delete(self._key(key))

    def close(self) -> None:
        self.client.close()


# -- the tiers together ------------------------------------------------------------------------
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


def open_state_cache(model: torch.nn.Module, budget_bytes: int, *, directory: str | Path | None = None,
                     directory_bytes: int = 0, url: str | None = None,
                     ttl_seconds: int | None = None) -> StateCache | TieredStateCache | None:
    """The state cache of one served model: the memory LRU alone (None when its budget is 0
    and no store is named), or with a disk (`directory`) or Redis (`url`) tier behind it.
    Stores are keyed by the model's fingerprint. A Redis that cannot be reached at start-up is
    a SamoutError (a misconfiguration is found at once; one that fails later is logged)."""
    if directory is not None and url is not None:
        raise SamoutError("give --state-cache-dir or --state-store, not both")
    if directory is None and url is None:
        return StateCache(budget_bytes) if budget_bytes > 0 else None
    if url is not None:
        check_redis_url(url)
    fingerprint = model_fingerprint(model)
    device = next(model.parameters()).device
    if directory is not None:
        store: StateStore = DiskStateStore(private_directory(directory) / fingerprint, directory_bytes)
    else:
        store = RedisStateStore(url, f"samout:state:{fingerprint}:", ttl_seconds)
        try:
            store.ping()
        except Exception as err:
            store.close()
            raise SamoutError(f"cannot reach the state store {redacted(url)}: {type(err).__name__}: {err}") \
                from None
    return TieredStateCache(StateCache(budget_bytes), store, device)
