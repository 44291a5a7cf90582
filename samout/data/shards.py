"""Token shards: how a split's token stream is written to files and read back as one array.

A split (train, val) is one stream of token ids cut into shards of exactly `shard_tokens`
tokens (the last one shorter): `train-00000.bin`, `train-00001.bin`, ... Cuts fall at token
counts, not at documents, so the stream, and every batch drawn from it, is the same
whatever the shard size. `meta.json` lists each shard's file, token count and SHA-256.

Why 2^27 tokens (256 MiB of uint16) by default: a shard is memory-mapped, so its size costs
no RAM (pages come and go with the page cache); a few hundred MiB keeps the file count low
(a 10-billion-token corpus is 75 shards) while a resumed `prepare` redoes at most one
shard, and a `torchrun` rank, which reads random windows of the whole stream (its rows of
the global batch), maps every shard without reading any of it in full.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from samout.errors import SamoutError

DEFAULT_SHARD_TOKENS = 1 << 27


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends token ids of one split to shards of `shard_tokens` tokens in `directory`.

    The shard being filled is written in place under its final name; `state()` is a
    JSON-able record of what is on disk (complete shards with their checksums, the tokens
    in the open one) from which `ShardWriter(..., state=...)` carries on after a crash:
    the open shard is cut back to the recorded length and later files are removed.
    """

    def __init__(self, directory: Path, split: str, dtype: Any, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 state: dict[str, Any] | None = None) -> None:
        if shard_tokens < 1:
            raise SamoutError(f"--shard-tokens must be at least 1, got {shard_tokens}")
        self.dir, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = list(state["shards"]) if state else []
        self.open_tokens = int(state["open_tokens"]) if state else 0
        index = len(self.shards)
        for stale in self.dir.glob(f"{split}-*.bin"):  # left by an earlier or crashed run
            try:
                number = int(stale.stem.rsplit("-", 1)[1])
            except ValueError:
                continue
            if number > index or (number == index and not self.open_tokens):
                stale.unlink()
        path = self.dir / shard_name(split, index)
        self._file = open(path, "r+b" if self.open_tokens else "wb")
        self._file.truncate(self.open_tokens * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.open_tokens

    def write(self, ids: np.ndarray) -> int:
        """Append `ids`; returns how many shards this completed."""
        ids = np.asarray(ids, dtype=self.dtype)
        done = 0
        while ids.size:
            take = min(ids.size, self.shard_tokens - self.open_tokens)
            self._file.write(ids[:take].tobytes())
            self.open_tokens += take
            ids = ids[take:]
            if self.open_tokens == self.shard_tokens:
                self._finish_open()
                done += 1
        return done

    def _finish_open(self) -> None:
        self._file.close()
        path = self.dir / shard_name(self.split, len(self.shards))
        self.shards.append({"file": path.name, "tokens": self.open_tokens, "sha256": file_sha256(path)})
        self.open_tokens = 0
        self._file = open(self.dir / shard_name(self.split, len(self.shards)), "wb")

    def flush(self) -> None:
        self._file.flush()

    def state(self) -> dict[str, Any]:
        self.flush()
        return {"shards": list(self.shards), "open_tokens": self.open_tokens}

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard (an empty one is removed unless it is the only one); the shards."""
        self._file.close()
        path = self.dir / shard_name(self.split, len(self.shards))
        if self.open_tokens or not self.shards:
            self.shards.append({"file": path.name, "tokens": self.open_tokens, "sha256": file_sha256(path)})
        else:
            path.unlink()
        self.open_tokens = 0
        return self.shards


class ShardedTokens:
    """Several memory-mapped shards read as one 1-D token array: `len`, integer and slice
    indexing (a slice across shards is copied together), `np.asarray` (reads everything)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def size(self) -> int:
        return len(self)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return np.asarray(self)[key]
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            out, pos = [], start
            for i in range(first, len(self.parts)):
                if pos >= stop:
                    break
                lo = pos - int(self.starts[i])
                hi = min(stop, int(self.starts[i + 1])) - int(self.starts[i])
                out.append(self.parts[i][lo:hi])
                pos = int(self.starts[i]) + hi
            return out[0] if len(out) == 1 else np.concatenate(out)
        index = int(key)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {key} is out of range for {n} tokens")
        i = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[i][index - int(self.starts[i])]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def max(self):
        return max(int(p.max()) for p in self.parts if len(p))


def open_split(directory: Path, info: dict[str, Any], dtype: str) -> np.ndarray | ShardedTokens:
    """The token array of one split of `meta.json`: its shards (format 2) or its single
    `file` (format 1, before shards); a missing or truncated file is a SamoutError."""
    shards = info.get("shards") or [{"file": info["file"], "tokens": info["tokens"]}]
    parts = []
    for shard in shards:
        path = directory / shard["file"]
        expected = int(shard["tokens"]) * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise SamoutError(f"{path} is missing or truncated: run `samout prepare` again")
        if shard["tokens"]:
            parts.append(np.memmap(path, dtype=dtype, mode="r"))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)
