"""Memory-mapped token files of a prepared data directory, and the batches read from them.

Training batches are a pure function of (seed, step, micro-step): a resumed or
restarted run reads exactly the batches an uninterrupted one would, with no data
position to save. A distributed run draws the same global batch and each rank takes
its own slice of rows, so N processes with batch B see exactly the rows one process
with batch N*B sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samout.data.prepare import DATA_FORMAT, DATA_VERSION, READ_VERSIONS
from samout.data.shards import ShardedTokens, open_split
from samout.errors import SamoutError
from samout.files import META_NAME
from samout.tokenizer import TOKENIZER_NAME


class TokenData:
    """`TokenData(data_dir)`: `.train` / `.val` token arrays (np.memmap, or ShardedTokens over
    several), `.meta`, `.tokenizer_path`. Reads format 2 (shards) and format 1 (one file)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        meta_path = self.dir / META_NAME
        if not self.dir.is_dir():
            raise SamoutError(
                f"data directory not found: {self.dir} (make one with `samout prepare --out DIR`)"
            )
        if not meta_path.is_file():
            raise SamoutError(
                f"{self.dir} is not a data directory made by `samout prepare` ({META_NAME} is missing)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SamoutError(f"{meta_path} is not valid JSON: run `samout prepare` again") from None
        if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
            raise SamoutError(f"{self.dir} is not a data directory made by `samout prepare`")
        if meta.get("version") not in READ_VERSIONS:
            raise SamoutError(f"{self.dir} has data format version {meta.get('version')}, "
                              f"this samout reads {DATA_VERSION}: run `samout prepare` again")
        self.meta: dict[str, Any] = meta
        self.tokenizer_path = self.dir / meta.get("tokenizer", TOKENIZER_NAME)
        self.vocab_size = int(meta["vocab_size"])
        # Each split memory-maps its shards and reads them as one stream (ShardedTokens), so
        # batches depend on the tokens only, never on how they are cut into files.
        self.splits: dict[str, np.ndarray | ShardedTokens] = {
            name: open_split(self.dir, info, meta["dtype"]) for name, info in meta["splits"].items()}

    @property
    def train(self) -> np.ndarray | ShardedTokens:
        return self.splits["train"]

    @property
    def val(self) -> np.ndarray | ShardedTokens:
        return self.splits["val"]

    def check_seq_len(self, seq_len: int, split: str = "train") -> None:
        n = len(self.splits[split])
        if seq_len < 1:
            raise SamoutError(f"--seq-len must be at least 1, got {seq_len}")
        if n < seq_len + 1:
            raise SamoutError(
                f"sequence length {seq_len} is longer than the {split} data ({n} tokens): "
                f"use --seq-len {max(1, n - 1)} or less, or prepare more text"
            )

    def train_batch(self, step: int, micro_step: int, batch_size: int, seq_len: int, seed: int,
                    rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [batch_size, seq_len]: rows rank*batch_size onwards of
        the global batch (world_size * batch_size rows at random offsets fixed by
        (seed, step, micro_step))."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world size {world_size}")
        data = self.train
        rng = np.random.default_rng([seed, step, micro_step, 0])
        starts = rng.integers(0, len(data) - seq_len, size=batch_size * world_size)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]
        rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def eval_windows(self, seq_len: int, max_windows: int | None = None,
                     split: str = "val") -> list[tuple[int, int]]:
        """Non-overlapping (start, length) windows over `split`: every token but the first is
        a target exactly once; `max_windows` picks that many spread evenly (deterministic)."""
        n = len(self.splits[split])
        seq_len = min(seq_len, n - 1)
        if seq_len < 1:
            raise SamoutError(f"the {split} split has {n} tokens, too few to evaluate: prepare more text")
        starts = list(range(0, n - 1, seq_len))
        if max_windows is not None and max_windows < len(starts):
            picks = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
            starts = [starts[i] for i in sorted(set(picks.tolist()))]
        return [(s, min(seq_len, n - 1 - s)) for s in starts]
