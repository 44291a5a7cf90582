"""`samout prepare`: documents -> tokenizer -> memory-mappable train/val token files.

A data directory holds:
    tokenizer.json   the tokenizer (trained on the training documents, or the user's)
    train.bin        token ids of the training documents, each followed by <|endoftext|>
    val.bin          the same for the validation documents
    meta.json        dtype, token and UTF-8 byte counts per split, the split, the sources
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from samout.data.sources import Document, load_documents
from samout.errors import SamoutError
from samout.files import META_NAME, atomic_write
from samout.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOT_ID,
    PAD_ID,
    TOKENIZER_NAME,
    check_vocab_size,
    load_tokenizer,
    train_tokenizer,
)

DATA_FORMAT = "samout-data"
DATA_VERSION = 1
# Below this many documents the split is made over pieces of the documents (line
# boundaries), so even a single text file gets a validation split.
MIN_SPLIT_UNITS = 20


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (given `seed`) split of document indices into train and validation."""
    if not 0 < val_fraction < 1:
        raise SamoutError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _cut_into_pieces(docs: list[Document], pieces: int) -> list[Document]:
    """Cut documents at line boundaries so there are about `pieces` units to split."""
    total = sum(len(d.text) for d in docs)
    target = max(1, total // pieces)
    out = []
    for doc in docs:
        current = ""
        for line in doc.text.splitlines(keepends=True):
            current += line
            if len(current) >= target:
                out.append(Document(doc.source, current))
                current = ""
        if current.strip():
            out.append(Document(doc.source, current))
    return out


def _tokenize(tokenizer, docs: list[Document], desc: str, quiet: bool, dtype) -> np.ndarray:
    """Token ids of every document followed by <|endoftext|>; `encode_batch` runs in parallel (Rust)."""
    chunks, batch = [], 256
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=True if quiet else None) as bar:
        for i in range(0, len(docs), batch):
            for enc in tokenizer.encode_batch([d.text for d in docs[i:i + batch]], add_special_tokens=False):
                chunks.append(np.asarray(enc.ids + [EOT_ID], dtype=dtype))
            bar.update(min(batch, len(docs) - i))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def _write_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def prepare(inputs: list[str] | None, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
            tokenizer: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
            quiet: bool = False) -> dict[str, Any]:
    """Build a data directory from `inputs` (default: the built-in `kjv`); returns its metadata."""
    if tokenizer is None:
        check_vocab_size(vocab_size)  # fail before reading a large corpus
    out_dir = Path(out_dir)
    docs, sources = load_documents(inputs)
    unit = "document"
    if len(docs) < MIN_SPLIT_UNITS:
        docs, unit = _cut_into_pieces(docs, MIN_SPLIT_UNITS), "piece of a document (cut at line breaks)"
    if len(docs) < 2:
        raise SamoutError("the corpus is too small to split into training and validation text: add more text")
    train_idx, val_idx = split_documents(docs, val_fraction, seed)
    train_docs, val_docs = [docs[i] for i in train_idx], [docs[i] for i in val_idx]

    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if Path(tokenizer).resolve() != (out_dir / TOKENIZER_NAME).resolve():
            shutil.copyfile(Path(tokenizer) / TOKENIZER_NAME if Path(tokenizer).is_dir() else tokenizer,
                            out_dir / TOKENIZER_NAME)
    else:
        if not quiet:
            print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(train_docs)} documents")
        tok = train_tokenizer((d.text for d in train_docs), vocab_size, show_progress=not quiet)
        atomic_write(out_dir / TOKENIZER_NAME, tok.to_str(pretty=True))
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32

    splits = {}
    for name, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = _tokenize(tok, split_docs, f"tokenizing {name}", quiet, dtype)
        _write_array(out_dir / f"{name}.bin", ids)
        splits[name] = {
            "file": f"{name}.bin",
            "tokens": int(ids.size),
            "bytes": sum(len(d.text.encode("utf-8")) for d in split_docs),
            "documents": len(split_docs),
        }
    meta = {
        "format": DATA_FORMAT,
        "version": DATA_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "pad_id": PAD_ID,
        "eot_id": EOT_ID,
        "split": {"seed": seed, "val_fraction": val_fraction, "unit": unit},
        "splits": splits,
        "sources": sources,
    }
    atomic_write(out_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta
