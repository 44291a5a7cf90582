"""Prompt data for reinforcement learning: `samout prepare --format prompts FILE.jsonl`.

Each line is `{"messages": [...], ...extra columns}`: a conversation that ends with a user
(or system) turn, whose reply `samout train --objective grpo` samples, and any other JSON
fields (a reference answer, a test case), which reach the reward functions as keyword
arguments, one value per completion (TRL's convention for dataset columns).

A prompts directory is an ordinary data directory (token shards `train-00000.bin`, ..., written
by the same ShardWriter as text data, hold the rendered prompts, generation prompt included, so
`TokenData` and `samout eval` read it) plus, per split:

    {split}_offsets.bin   int64, n+1 entries: prompt i is tokens[offsets[i]:offsets[i+1]]
    {split}_rows.jsonl    prompt i's messages and extra columns, one JSON object a line
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from samout.chat.template import DEFAULT_CHAT_TEMPLATE, encode_rendered, render_text
from samout.data.dataset import TokenData
from samout.data.prepare import DATA_FORMAT, DATA_VERSION, split_documents
from samout.data.shards import ShardWriter
from samout.data.sources import jsonl_records
from samout.errors import SamoutError
from samout.files import META_NAME, atomic_write
from samout.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOT_ID,
    PAD_ID,
    TOKENIZER_NAME,
    add_chat_tokens,
    load_tokenizer,
    train_tokenizer,
    update_tokenizer_config,
)

KIND = "prompts"
DEFAULT_MAX_PROMPT_TOKENS = 512


def _fail(where: str, why: str) -> None:
    raise SamoutError(f"{where}: {why}")


def read_prompts(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(`file:line`, {"messages": [...], extra columns...}) of every line; a bad line is one
    SamoutError naming file:line."""
    if not path.is_file():
        raise SamoutError(f"input not found: {path} (--format prompts reads JSONL files)")
    rows = []
    for where, obj in jsonl_records(path):
        if not isinstance(obj, dict):
            _fail(where, "each line must be a JSON object")
        if "messages" not in obj:
            _fail(where, "no \"messages\" field (prompt lines hold {\"messages\": [...], ...columns})")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            _fail(where, "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                _fail(where, f"messages[{i}] is not an object")
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant"):
                _fail(where, f"messages[{i}] has unknown role {role!r} (use system, user or assistant)")
            if not isinstance(content, str):
                _fail(where, f"messages[{i}] ({role}) has no text \"content\"")
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] == "assistant":
            _fail(where, "the prompt ends with an assistant turn (the reply is what is sampled; put a "
                         "reference answer in a column such as \"answer\")")
        for key in ("prompts", "completions", "completion_ids"):
            if key in obj:
                _fail(where, f"the column name {key!r} is reserved (reward functions get it from samout)")
        rows.append((where, {**obj, "messages": clean}))
    return rows


def prepare_prompts(inputs: list[str], out_dir: str | Path, tokenizer: str | Path | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = 0.05, seed: int = 0,
                    max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, quiet: bool = False) -> dict[str, Any]:
    """Build a prompts data directory from JSONL files; returns its metadata. Prompts longer
    than `max_tokens` are dropped (reported)."""
    if not inputs:
        raise SamoutError("--format prompts needs JSONL files as inputs")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise SamoutError(f"--max-tokens must be a positive integer, got {max_tokens!r}")
    rows: list[tuple[str, dict[str, Any]]] = []
    sources = []
    for name in inputs:
        found = read_prompts(Path(name))
        rows += found
        sources.append({"path": str(name), "kind": "prompts-jsonl", "examples": len(found)})
    if len(rows) < 2:
        raise SamoutError(f"{', '.join(inputs)}: need at least 2 prompts to split into training and "
                          "validation")
    train_idx, val_idx = split_documents(rows, val_fraction, seed)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        add_chat_tokens(tok)
    else:
        texts = (m["content"] for i in train_idx for m in rows[i][1]["messages"])
        tok = train_tokenizer(texts, vocab_size, show_progress=not quiet, chat=True)
    atomic_write(out_dir / TOKENIZER_NAME, tok.to_str(pretty=True))
    template = DEFAULT_CHAT_TEMPLATE
    update_tokenizer_config(out_dir, chat_template=template)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    splits, dropped = {}, []
    for split, idx in (("train", train_idx), ("val", val_idx)):
        parts, kept = [], []
        for i in idx:
            where, row = rows[i]
            ids = encode_rendered(tok, render_text(row["messages"], template, add_generation_prompt=True))
            if len(ids) > max_tokens:
                dropped.append(where)
                continue
            parts.append(np.asarray(ids, dtype=dtype))
            kept.append(row)
        if not kept:
            raise SamoutError(f"no {split} prompt is left after dropping the ones longer than --max-tokens "
                              f"{max_tokens}: raise --max-tokens")
        tokens = np.concatenate(parts)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        writer = ShardWriter(out_dir, split, dtype)
        writer.write(tokens)
        shards = writer.close()
        tmp = out_dir / f".{split}_offsets.bin.tmp"
        offsets.tofile(tmp)
        tmp.replace(out_dir / f"{split}_offsets.bin")
        atomic_write(out_dir / f"{split}_rows.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        splits[split] = {"shards": shards, "tokens": int(tokens.size), "documents": len(kept),
                         "bytes": sum(len(m["content"].encode()) for r in kept for m in r["messages"]),
                         "sequences": len(kept), "offsets": f"{split}_offsets.bin",
                         "rows": f"{split}_rows.jsonl"}
    if dropped and not quiet:
        print(f"{len(dropped)} prompt(s) longer than --max-tokens {max_tokens} were dropped "
              f"(first {dropped[0]})")
    meta = {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": KIND, "tokenizer": TOKENIZER_NAME,
            "vocab_size": vocab, "dtype": np.dtype(dtype).name, "pad_id": PAD_ID, "eot_id": EOT_ID,
            "split": {"seed": seed, "val_fraction": val_fraction, "unit": "prompt"},
            "max_tokens": max_tokens, "overlong_report": {"dropped": len(dropped)},
            "splits": splits, "sources": sources}
    atomic_write(out_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


class PromptData(TokenData):
    """A `--format prompts` directory: TokenData plus each prompt's token ids and columns."""

    def __init__(self, data_dir: str | Path) -> None:
        super().__init__(data_dir)
        have = self.meta.get("kind", "text")
        if have != KIND:
            raise SamoutError(f"{self.dir} holds {have} data, not prompts (make it with "
                              "`samout prepare --format prompts FILE.jsonl --tokenizer RUN_DIR`)")
        self.offsets: dict[str, np.ndarray] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        for name, info in self.meta["splits"].items():
            off_path, rows_path = self.dir / info["offsets"], self.dir / info["rows"]
            if not off_path.is_file() or off_path.stat().st_size != 8 * (info["sequences"] + 1):
                raise SamoutError(f"{off_path} is missing or truncated: run `samout prepare` again")
            if not rows_path.is_file():
                raise SamoutError(f"{rows_path} is missing: run `samout prepare` again")
            self.offsets[name] = np.fromfile(off_path, dtype=np.int64)
            self.rows[name] = [json.loads(line) for line in rows_path.read_text().splitlines() if line]
            if len(self.rows[name]) != info["sequences"]:
                raise SamoutError(f"{rows_path} is truncated: run `samout prepare` again")

    def num_prompts(self, split: str) -> int:
        return len(self.offsets[split]) - 1

    def prompt_ids(self, split: str, i: int) -> list[int]:
        a, b = int(self.offsets[split][i]), int(self.offsets[split][i + 1])
        return np.asarray(self.splits[split][a:b], dtype=np.int64).tolist()

    def columns(self, split: str, i: int) -> dict[str, Any]:
        """Prompt i's row: "messages" and its extra columns."""
        return self.rows[split][i]

    def check_seq_len(self, seq_len: int, split: str = "train") -> None:
        """Prompts are never cut; --seq-len does not apply to them."""
