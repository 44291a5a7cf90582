"""Conversation data: `samout prepare --format chat|dpo` and the batches SFT and DPO train on.

A chat or DPO data directory is an ordinary data directory (token shards `train-00000.bin`,
..., `val-00000.bin`, ..., written by the same ShardWriter as text data, `tokenizer.json`,
`meta.json`, so `--objective lm` and `samout eval` read it too) plus, per split:

    {split}_mask.bin      uint8, one per token: 1 on assistant tokens and their <|end|>
    {split}_offsets.bin   int64, n+1 entries: sequence i is tokens[offsets[i]:offsets[i+1]]

and `tokenizer_config.json` with the chat template. A chat sequence is one rendered
conversation; a DPO directory stores each pair as two sequences, prompt + chosen (2i) and
prompt + rejected (2i+1), whose masks cover the two completions.

Batches are pure functions of (seed, step, micro-step): SFT draws conversations at random
and packs them into rows of `seq_len` tokens (a row is closed when the next conversation
does not fit; one longer than `seq_len` is cut to it), then runs every conversation of the
rows as its own segment with a fresh state. So a packed batch gives exactly the loss and
gradients of its conversations run one by one: SamOut's running max never carries from one
conversation into the next.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samout.chat.template import (
    DEFAULT_CHAT_TEMPLATE,
    assistant_mask,
    check_message,
    encode_rendered,
    last_turn_mask,
    render_text,
)
from samout.chat.tools import call_text, check_tools
from samout.data.dataset import TokenData
from samout.data.prepare import DATA_FORMAT, DATA_VERSION, split_documents
from samout.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter
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

FORMATS = ("text", "chat", "dpo")
OVERLONG_RULES = ("drop", "truncate")
DEFAULT_MAX_TOKENS = 1024
IGNORE = -100  # targets cross-entropy skips


@dataclass
class Example:
    where: str  # file:line
    sequences: list[list[dict[str, Any]]]  # chat: [messages]; dpo: [prompt+chosen, prompt+rejected]
    prompt_len: int = 0  # dpo: messages in the prompt
    tools: list[dict] | None = None  # the line's "tools" (function definitions the template shows)


def _fail(where: str, why: str) -> None:
    raise SamoutError(f"{where}: {why}")


def _messages(value: Any, where: str, what: str) -> list[dict[str, Any]]:
    """Checked messages (samout.chat.template.check_message: an assistant's `tool_calls`, the
    `tool` role with its `tool_call_id`); errors name file:line and the message."""
    if not isinstance(value, list) or not value:
        _fail(where, f"\"{what}\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            _fail(where, f"{what}[{i}] is not an object")
        out.append(check_message(message, f"{where}: {what}[{i}]"))
    return out


def _tools(obj: dict, where: str) -> list[dict] | None:
    if "tools" not in obj:
        return None
    return check_tools(obj["tools"], f"{where}: tools") or None


def _completion(value: Any, where: str, what: str) -> dict[str, str]:
    """A DPO completion: a string, an assistant message, or a list holding one."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role", "assistant") == "assistant" \
            and isinstance(value.get("content"), str):
        return {"role": "assistant", "content": value["content"]}
    _fail(where, f"\"{what}\" must be a string or one assistant message")
    raise AssertionError


def read_jsonl(path: Path, fmt: str) -> list[Example]:
    """Examples of a chat or DPO JSONL file; a bad line is a SamoutError naming file:line."""
    examples = []
    if not path.is_file():
        raise SamoutError(f"input not found: {path} (a {fmt} JSONL file)")
    for where, obj in jsonl_records(path):
        if not isinstance(obj, dict):
            _fail(where, "each line must be a JSON object")
        if fmt == "chat":
            if "messages" not in obj:
                _fail(where, "no \"messages\" field")
            messages = _messages(obj["messages"], where, "messages")
            if messages[-1]["role"] != "assistant":
                _fail(where, "the conversation does not end with an assistant turn")
            examples.append(Example(where, [messages], tools=_tools(obj, where)))
        else:
            for key in ("prompt", "chosen", "rejected"):
                if key not in obj:
                    _fail(where, f"no \"{key}\" field (DPO lines hold prompt, chosen and rejected)")
            prompt = _messages(obj["prompt"], where, "prompt")
            if prompt[-1]["role"] == "assistant":
                _fail(where, "the prompt ends with an assistant turn (chosen and rejected are the reply)")
            chosen = _completion(obj["chosen"], where, "chosen")
            rejected = _completion(obj["rejected"], where, "rejected")
            examples.append(Example(where, [prompt + [chosen], prompt + [rejected]], len(prompt),
                                    tools=_tools(obj, where)))
    return examples


def _encode(tokenizer, messages: list[dict[str, Any]], template: str, fmt: str = "chat",
            tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    ids = encode_rendered(tokenizer, render_text(messages, template, tools=tools))
    return ids, (assistant_mask if fmt == "chat" else last_turn_mask)(tokenizer, ids)


def _fit(tokenizer, example: Example, template: str, max_tokens: int, rule: str, fmt: str):
    """[(ids, mask)] of the example's sequences within `max_tokens`, or None (dropped)."""
    encoded = [_encode(tokenizer, seq, template, fmt, example.tools) for seq in example.sequences]
    if all(len(ids) <= max_tokens for ids, _ in encoded):
        return encoded, False
    if fmt == "dpo" or rule == "drop":
        return None, True
    # truncate: the longest prefix of whole turns that ends with an assistant turn and fits.
    messages = example.sequences[0]
    for end in range(len(messages) - 1, 0, -1):
        if messages[end - 1]["role"] == "assistant":
            ids, mask = _encode(tokenizer, messages[:end], template, tools=example.tools)
            if len(ids) <= max_tokens:
                return [(ids, mask)], True
    return None, True


def _texts(message: dict[str, Any]) -> list[str]:
    """The text a message puts in a conversation (for training its tokenizer): its content
    and its tool calls as the model writes them."""
    calls = [call_text(c["function"]["name"], c["function"]["arguments"])
             for c in message.get("tool_calls", ())]
    return [message["content"], *calls]


def _write(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def prepare_conversations(inputs: list[str], out_dir: str | Path, fmt: str = "chat",
                          vocab_size: int = DEFAULT_VOCAB_SIZE, tokenizer: str | Path | None = None,
                          val_fraction: float = 0.05, seed: int = 0, max_tokens: int = DEFAULT_MAX_TOKENS,
                          overlong: str = "drop", quiet: bool = False,
                          shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict[str, Any]:
    """Build a chat or DPO data directory from JSONL files; returns its metadata."""
    if fmt not in ("chat", "dpo"):
        raise SamoutError(f"unknown format {fmt!r}: use chat or dpo")
    if overlong not in OVERLONG_RULES:
        raise SamoutError(f"--overlong must be one of {', '.join(OVERLONG_RULES)}, got {overlong!r}")
    if not isinstance(max_tokens, int) or max_tokens < 4:
        raise SamoutError(f"--max-tokens must be an integer of at least 4, got {max_tokens!r}")
    if not inputs:
        raise SamoutError(f"--format {fmt} needs JSONL files as inputs")
    examples: list[Example] = []
    sources = []
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise SamoutError(f"input not found: {path} (--format {fmt} reads JSONL files)")
        found = read_jsonl(path, fmt)
        examples += found
        sources.append({"path": str(path), "kind": f"{fmt}-jsonl", "examples": len(found)})
    if len(examples) < 2:
        raise SamoutError(f"{', '.join(inputs)}: need at least 2 examples to split into training and "
                          "validation")
    train_idx, val_idx = split_documents(examples, val_fraction, seed)  # type: ignore[arg-type]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        added = add_chat_tokens(tok)
        if added and not quiet:
            first = tok.get_vocab_size() - len(added)
            print(f"added the chat tokens {' '.join(added)} to the tokenizer (ids {first}-"
                  f"{first + len(added) - 1}); `samout train --init-from` grows the model's embedding")
    else:
        texts = (text for i in train_idx for seq in examples[i].sequences for m in seq for text in _texts(m))
        if not quiet:
            print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(train_idx)} examples")
        tok = train_tokenizer(texts, vocab_size, show_progress=not quiet, chat=True)
    atomic_write(out_dir / TOKENIZER_NAME, tok.to_str(pretty=True))
    template = DEFAULT_CHAT_TEMPLATE
    update_tokenizer_config(out_dir, chat_template=template)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32

    splits, dropped, truncated = {}, [], 0
    for split, idx in (("train", train_idx), ("val", val_idx)):
        ids_parts, mask_parts, lengths = [], [], []
        kept = 0
        for i in idx:
            fitted, cut = _fit(tok, examples[i], template, max_tokens, overlong, fmt)
            if fitted is None:
                dropped.append(examples[i].where)
                continue
            truncated += cut
            kept += 1
            for ids, mask in fitted:
                ids_parts.append(np.asarray(ids, dtype=dtype))
                mask_parts.append(np.asarray(mask, dtype=np.uint8))
                lengths.append(len(ids))
        if kept == 0:
            raise SamoutError(f"no {split} example is left after dropping the ones longer than --max-tokens "
                              f"{max_tokens}: raise --max-tokens")
        tokens = np.concatenate(ids_parts)
        masks = np.concatenate(mask_parts)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        writer = ShardWriter(out_dir, split, dtype, shard_tokens)
        writer.write(tokens)
        shards = writer.close()
        _write(out_dir / f"{split}_mask.bin", masks)
        _write(out_dir / f"{split}_offsets.bin", offsets)
        splits[split] = {"shards": shards, "tokens": int(tokens.size),
                         "bytes": int(sum(len(tok.decode(p.tolist(), skip_special_tokens=True).encode())
                                          for p in ids_parts)),
                         "documents": kept, "sequences": len(lengths), "mask": f"{split}_mask.bin",
                         "offsets": f"{split}_offsets.bin", "masked_tokens": int(masks.sum())}
    if (dropped or truncated) and not quiet:
        rule = "dropped" if fmt == "dpo" or overlong == "drop" else "truncated to whole turns"
        print(f"{len(dropped) + truncated} example(s) longer than --max-tokens {max_tokens} were {rule}"
              + (f" ({len(dropped)} dropped, first {dropped[0]})" if dropped else ""))
    meta = {
        "format": DATA_FORMAT, "version": DATA_VERSION, "kind": fmt, "tokenizer": TOKENIZER_NAME,
        "vocab_size": vocab, "dtype": np.dtype(dtype).name, "pad_id": PAD_ID, "eot_id": EOT_ID,
        "split": {"seed": seed, "val_fraction": val_fraction, "unit": "example"},
        "shard_tokens": shard_tokens, "max_tokens": max_tokens, "overlong": overlong,
        "overlong_report": {"dropped": len(dropped), "truncated": int(truncated)},
        "splits": splits, "sources": sources,
    }
    atomic_write(out_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


class ChatData(TokenData):
    """A data directory of `--format chat` or `dpo`: TokenData plus masks and sequence offsets."""

    def __init__(self, data_dir: str | Path, kind: str | None = None) -> None:
        super().__init__(data_dir)
        have = self.meta.get("kind", "text")
        if kind is not None and have != kind:
            hint = {"text": "samout prepare --format chat|dpo", "chat": "--objective sft",
                    "dpo": "--objective dpo", "prompts": "--objective grpo"}.get(have, "")
            raise SamoutError(f"{self.dir} holds {have} data, not {kind} data ({hint})")
        self.kind = have
        self.masks: dict[str, np.ndarray] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for name, info in self.meta["splits"].items():
            mask_path, off_path = self.dir / info["mask"], self.dir / info["offsets"]
            if not mask_path.is_file() or mask_path.stat().st_size != info["tokens"]:
                raise SamoutError(f"{mask_path} is missing or truncated: run `samout prepare` again")
            if not off_path.is_file() or off_path.stat().st_size != 8 * (info["sequences"] + 1):
                raise SamoutError(f"{off_path} is missing or truncated: run `samout prepare` again")
            self.masks[name] = np.memmap(mask_path, dtype=np.uint8, mode="r")
            self.offsets[name] = np.fromfile(off_path, dtype=np.int64)

    def num_sequences(self, split: str) -> int:
        return len(self.offsets[split]) - 1

    def sequence(self, split: str, i: int, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, mask) of sequence i, cut to `max_len` tokens."""
        a, b = int(self.offsets[split][i]), int(self.offsets[split][i + 1])
        if max_len is not None:
            b = min(b, a + max_len)
        return np.asarray(self.splits[split][a:b], dtype=np.int64), np.asarray(self.masks[split][a:b])

    def packed_rows(self, step: int, micro_step: int, batch_size: int, seq_len: int, seed: int,
                    rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This rank's rows of the global batch: each a list of train conversation indices whose
        lengths (each cut to seq_len) sum to at most seq_len. A pure function of its arguments."""
        rng = np.random.default_rng([seed, step, micro_step, 0])
        n = self.num_sequences("train")
        lengths = np.diff(self.offsets["train"])
        rows = []
        for _ in range(batch_size * world_size):
            row, used = [], 0
            while True:
                i = int(rng.integers(n))
                size = min(int(lengths[i]), seq_len)
                if row and used + size > seq_len:
                    break
                row.append(i)
                used += size
                if used >= seq_len:
                    break
            rows.append(row)
        return rows[rank * batch_size:(rank + 1) * batch_size]

    def segments(self, split: str, indices: list[int], max_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [len(indices), L-1] for the sequences `indices`, each its own row
        padded on the right (padding never reaches earlier positions: SamOut is causal). Targets
        are -100 where the mask is 0 and on padding."""
        seqs = [self.sequence(split, i, max_len) for i in indices]
        return segment_batch([s[0] for s in seqs], [s[1] for s in seqs])


def segment_batch(seqs: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded next-token inputs and masked targets for a list of sequences."""
    width = max(1, max(len(s) for s in seqs) - 1)
    x = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    y = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for r, (ids, mask) in enumerate(zip(seqs, masks)):
        n = len(ids) - 1
        if n <= 0:
            continue
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        x[r, :n] = ids_t[:-1]
        target = ids_t[1:].clone()
        target[torch.from_numpy(np.asarray(mask[1:], dtype=np.bool_)) == 0] = IGNORE
        y[r, :n] = target
    return x, y
