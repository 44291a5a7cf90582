"""The disk tier of the state cache (`--state-cache-dir`): one file per state, written
atomically, LRU within a byte budget, found again after a restart. See state_store.py."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from samout.errors import SamoutError
from samout.files import atomic_write
from samout.serve.state_format import Key
from samout.serve.state_store import StateStore

FILE_SUFFIX = ".state"
_FILE_NAME = re.compile(r"^(\d+)-([0-9a-f]{64})\.state$")


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
        # private: a state file is the owner's alone (0600), and a directory removed under us
        # is not recreated with the default mode.
        atomic_write(path, data, private=True)
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
