"""`samout prepare`: documents -> tokenizer -> memory-mappable train/val token shards.

A data directory holds:
    tokenizer.json       the tokenizer (trained on a sample of the training text, or the user's)
    train-00000.bin ...  token ids of the training documents, each followed by <|endoftext|>,
                         cut into shards of --shard-tokens tokens (samout.data.shards)
    val-00000.bin ...    the same for the validation documents
    meta.json            dtype, shards (file, tokens, SHA-256), token/byte/document counts per
                         split, the split rule, the sources

The corpus streams through in bounded pieces (samout.data.sources.Corpus): text is read a
piece at a time, tokenized in chunks by `--workers` processes (ids only, in input order),
and appended to the shards, so memory does not grow with the corpus and the output is the
same bytes for any number of workers. A checkpoint (`.prepare-state.json`) is written each
time a shard is finished; `--resume` carries on from it.

The split is by whole documents and deterministic in `seed`:
  * a corpus of at most SMALL_CORPUS_BYTES is split as it always was: all its documents
    are known, a random permutation (seeded) holds out round(val_fraction * n) of them
    (at least one), and fewer than MIN_SPLIT_UNITS documents are first cut at line breaks;
  * a larger corpus is first counted (read, not tokenized, not held); with at most
    SPLIT_BLOCK documents the same seeded permutation rule applies, so the split is the
    one prepare always made. Beyond, documents are taken in blocks of SPLIT_BLOCK in input
    order, and block b holds out the first round(val_fraction * size) positions of a
    permutation seeded by (seed, b): only one block is in memory, and the fraction is
    exact per block. Fewer than MIN_SPLIT_UNITS documents: the pieces (cut at line
    breaks, at most 2^18 characters) are the units, each followed by <|endoftext|>.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from samout.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, file_sha256
from samout.data.sources import TEXT_COLUMN, Corpus, Document, Piece, cut_pieces
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
DATA_VERSION = 2  # 2: shards; 1: one train.bin / val.bin (still read)
READ_VERSIONS = (1, 2)
# Below this many documents the split is made over pieces of the documents (line
# boundaries), so even a single text file gets a validation split.
MIN_SPLIT_UNITS = 20
SMALL_CORPUS_BYTES = 32 << 20
SPLIT_BLOCK = 10_000
# Text per tokenization task: a worker's transient memory is ~100 bytes per token of it
# (the tokenizer's Encodings, then Python's lists of ids), so a few MB at this size.
CHUNK_CHARS = 1 << 18
DEFAULT_TOKENIZER_SAMPLE = 100_000_000
STATE_NAME = ".prepare-state.json"
# Tests: SIGKILL this process once this many shards are finished (a crash at a known point).
KILL_ENV = "SAMOUT_PREPARE_KILL_AFTER_SHARDS"


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise SamoutError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (given `seed`) split of document indices into train and validation."""
    _check_fraction(val_fraction)
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class BlockSplit:
    """The split of a streamed corpus of `n` units: is unit i a validation unit?

    Up to SPLIT_BLOCK units it is `split_documents`' rule exactly (one seeded permutation of
    all n); beyond, units are taken in blocks of SPLIT_BLOCK in input order and block b holds
    out the first round(val_fraction * size) positions of a permutation seeded by (seed, b)
    (at least one in the first block), so no more than a block is ever in memory.
    """

    def __init__(self, val_fraction: float, seed: int, n: int) -> None:
        _check_fraction(val_fraction)
        self.val_fraction, self.seed, self.n = val_fraction, seed, n
        self._block, self._val = -1, np.zeros(0, dtype=bool)

    def __call__(self, index: int) -> bool:
        block = index // SPLIT_BLOCK if self.n > SPLIT_BLOCK else 0
        if block != self._block:
            if self.n <= SPLIT_BLOCK:
                size = self.n
                order = np.random.default_rng(self.seed).permutation(size)
                n_val = min(size - 1, max(1, round(self.val_fraction * size)))
            else:
                size = min(SPLIT_BLOCK, self.n - block * SPLIT_BLOCK)
                order = np.random.default_rng([self.seed, block]).permutation(size)
                n_val = round(self.val_fraction * size) if block else max(1, round(self.val_fraction * size))
            self._val = np.zeros(size, dtype=bool)
            self._val[order[:n_val]] = True
            self._block = block
        return bool(self._val[index - block * SPLIT_BLOCK])


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


def _hash_unit(seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, index): splitmix64."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) / 2**64


class _Plan:
    """What is tokenized, in which order, into which split: `pieces()`, `is_val(unit)`, and
    `per_piece`: whether each piece is a unit of the split (followed by <|endoftext|>), as
    in a corpus of fewer than MIN_SPLIT_UNITS documents, or each document."""

    def __init__(self, corpus: Corpus, val_fraction: float, seed: int) -> None:
        _check_fraction(val_fraction)
        self.corpus = corpus
        held: list[Piece] = []
        size, stream = 0, corpus.pieces()
        for piece in stream:
            held.append(piece)
            size += piece.nbytes
            if size > SMALL_CORPUS_BYTES:
                break
        else:  # the whole corpus is in `held`: split it as prepare always has
            self.docs = self._join(held)
            self.unit = "document"
            if len(self.docs) < MIN_SPLIT_UNITS:
                self.docs = _cut_into_pieces(self.docs, MIN_SPLIT_UNITS)
                self.unit = "piece of a document (cut at line breaks)"
            if len(self.docs) < 2:
                raise SamoutError("the corpus is too small to split into training and validation text: "
                                  "add more text")
            self.val_set = set(split_documents(self.docs, val_fraction, seed)[1])
            self.rule = "permutation"
            self.is_val: Callable[[int], bool] = self.val_set.__contains__
            self.per_piece = False
            return
        stream.close()
        # A larger corpus: count its documents (reading, not tokenizing) so the split can
        # follow the same rule without holding them.
        self.docs = None
        n_docs = n_pieces = 0
        for piece in corpus.pieces():
            n_pieces += 1
            n_docs += piece.last
        self.per_piece = n_docs < MIN_SPLIT_UNITS
        self.unit = "piece of a document (cut at line breaks)" if self.per_piece else "document"
        units = n_pieces if self.per_piece else n_docs
        if units < 2:
            raise SamoutError("the corpus is too small to split into training and validation text: "
                              "add more text")
        self.rule = "permutation" if units <= SPLIT_BLOCK else f"blocks of {SPLIT_BLOCK}"
        self.is_val = BlockSplit(val_fraction, seed, units)

    @staticmethod
    def _join(pieces: list[Piece]) -> list[Document]:
        docs, held = [], []
        for piece in pieces:
            held.append(piece.text)
            if piece.last:
                docs.append(Document(piece.source, "".join(held)))
                held = []
        return docs

    def pieces(self) -> Iterator[Piece]:
        if self.docs is None:
            yield from self.corpus.pieces()
            return
        for doc in self.docs:
            parts = list(cut_pieces(doc.text))
            for i, part in enumerate(parts):
                yield Piece(part, i == len(parts) - 1, doc.source, len(part.encode("utf-8")))


def _tokenizer_sample(plan: _Plan, budget: int, seed: int) -> tuple[list[str], int, int]:
    """Training-split text for the tokenizer: every piece if it all fits in `budget` bytes,
    else the pieces whose hash (seed, index) falls below a threshold halved until they fit.
    Returns (texts in corpus order, bytes used, bytes of training text seen)."""
    kept: list[tuple[float, str, int]] = []
    used = seen = unit = 0
    threshold = 1.0
    for index, piece in enumerate(plan.pieces()):
        if not plan.is_val(unit):
            seen += piece.nbytes
            u = _hash_unit(seed, index)
            if u < threshold:
                kept.append((u, piece.text, piece.nbytes))
                used += piece.nbytes
                while used > budget:
                    threshold /= 2
                    kept = [k for k in kept if k[0] < threshold]
                    used = sum(k[2] for k in kept)
        unit += piece.last or plan.per_piece
    return [k[1] for k in kept], used, seen


# -- tokenization in worker processes ---------------------------------------------------

_TOKENIZER: Any = None


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with contextlib.suppress(Exception):  # end with the parent, even if it is SIGKILLed
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _encode_chunk(texts: list[str]) -> tuple[bytes, np.ndarray]:
    """Token ids of each text, concatenated (uint32 bytes), and each text's count."""
    batch = getattr(_TOKENIZER, "encode_batch_fast", None) or _TOKENIZER.encode_batch
    encodings = [e.ids for e in batch(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(ids) for ids in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(encodings), dtype=np.uint32, count=int(lengths.sum()))
    return ids.tobytes(), lengths


def _chunks(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece.text)
        if size >= CHUNK_CHARS or len(chunk) >= 4096:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_pieces(tokenizer, pieces: Iterator[Piece], workers: int
                    ) -> Iterator[tuple[Piece, np.ndarray]]:
    """(piece, its token ids) in input order; `workers` processes (1: this one) tokenize
    chunks of about CHUNK_CHARS characters, at most 2 * workers chunks in flight."""
    global _TOKENIZER
    _TOKENIZER = tokenizer
    if workers <= 1:
        for chunk in _chunks(pieces):
            yield from _split_result(chunk, _encode_chunk([p.text for p in chunk]))
        return
    import gc
    import multiprocessing
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
    # Objects made before the fork are left out of the workers' garbage collection, so it
    # does not touch (and so copy) the parent's pages: less memory per worker.
    gc.freeze()
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker)
    gc.unfreeze()  # the workers are forked: the parent collects as usual
    with pool:
        pending: deque = deque()
        for chunk in _chunks(pieces):
            pending.append((chunk, pool.apply_async(_encode_chunk, ([p.text for p in chunk],))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield from _split_result(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from _split_result(done, result.get())


def _split_result(chunk: list[Piece], result: tuple[bytes, np.ndarray]) -> Iterator[tuple[Piece, np.ndarray]]:
    ids = np.frombuffer(result[0], dtype=np.uint32)
    ends = np.cumsum(result[1])
    for piece, start, end in zip(chunk, ends - result[1], ends):
        yield piece, ids[start:end]


# -- the data directory -------------------------------------------------------------------

def _settings(corpus: Corpus, seed: int, val_fraction: float, shard_tokens: int, tokenizer_sha: str) -> dict:
    return {"inputs": corpus.inputs, "text_column": corpus.text_column, "seed": seed,
            "val_fraction": val_fraction, "shard_tokens": shard_tokens, "tokenizer_sha256": tokenizer_sha}


def _load_state(out_dir: Path, settings: dict) -> dict | None:
    path = out_dir / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if state.get("settings") != settings:
        raise SamoutError(f"{out_dir} holds an interrupted prepare with other inputs or settings: "
                          "run it with the same ones, or without --resume to start over")
    return state


def prepare(inputs: list[str] | None, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
            tokenizer: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
            quiet: bool = False, workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            text_column: str = TEXT_COLUMN, tokenizer_sample: int = DEFAULT_TOKENIZER_SAMPLE,
            resume: bool = False) -> dict[str, Any]:
    """Build a data directory from `inputs` (default: the built-in `kjv`); returns its metadata."""
    if tokenizer is None:
        check_vocab_size(vocab_size)  # fail before reading a large corpus
    _check_fraction(val_fraction)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise SamoutError(f"--workers must be at least 1, got {workers}")
    if shard_tokens < 1:
        raise SamoutError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if tokenizer_sample < 1:
        raise SamoutError(f"--tokenizer-sample must be at least 1 byte, got {tokenizer_sample}")
    out_dir = Path(out_dir)
    corpus = Corpus(inputs, text_column)
    plan = _Plan(corpus, val_fraction, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir / TOKENIZER_NAME
    sample_info = None
    resumable = resume and (out_dir / STATE_NAME).is_file() and tok_path.is_file()
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if Path(tokenizer).resolve() != tok_path.resolve():
            source = Path(tokenizer) / TOKENIZER_NAME if Path(tokenizer).is_dir() else Path(tokenizer)
            shutil.copyfile(source, tok_path)
    elif resumable:  # the interrupted run's tokenizer (training again might not give the same one)
        tok = load_tokenizer(tok_path)
    else:
        texts, used, seen = _tokenizer_sample(plan, tokenizer_sample, seed)
        sample_info = {"bytes": used, "of_bytes": seen, "limit": tokenizer_sample}
        if not quiet:
            print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {used / 1e6:,.1f} MB "
                  f"of {seen / 1e6:,.1f} MB of training text (--tokenizer-sample {tokenizer_sample:,})")
        tok = train_tokenizer(texts, vocab_size, show_progress=not quiet)
        del texts
        atomic_write(tok_path, tok.to_str(pretty=True))
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    settings = _settings(corpus, seed, val_fraction, shard_tokens, file_sha256(tok_path))
    state = _load_state(out_dir, settings) if resume else None
    if resume and state is None and not quiet:
        print(f"nothing to resume in {out_dir} (no {STATE_NAME}): starting from the beginning")
    if state is None:
        (out_dir / STATE_NAME).unlink(missing_ok=True)
        for legacy in ("train.bin", "val.bin"):  # format 1's files: not part of this directory any more
            (out_dir / legacy).unlink(missing_ok=True)
    elif sample_info is None:
        sample_info = state.get("tokenizer_sample")

    names = ("train", "val")
    stats = {n: {"bytes": 0, "documents": 0} for n in names}
    skip = doc = 0
    if state is not None:
        stats = {n: {k: state["splits"][n][k] for k in ("bytes", "documents")} for n in names}
        skip, doc = state["pieces"], state["documents"]
    writers = {n: ShardWriter(out_dir, n, dtype, shard_tokens, state["splits"][n] if state else None)
               for n in names}
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)

    def checkpoint(pieces_done: int) -> None:
        record = {"settings": settings, "pieces": pieces_done, "documents": doc,
                  "tokenizer_sample": sample_info,
                  "splits": {n: {**writers[n].state(), **stats[n]} for n in names}}
        atomic_write(out_dir / STATE_NAME, json.dumps(record) + "\n")
        if kill_after and sum(len(w.shards) for w in writers.values()) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def remaining() -> Iterator[Piece]:
        stream = plan.pieces()
        for index, piece in enumerate(stream):
            if index >= skip:
                yield piece

    eot = np.array([EOT_ID], dtype=dtype)
    index = skip
    with tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=True if quiet else None) as bar:
        for piece, ids in tokenize_pieces(tok, remaining(), workers):
            name = "val" if plan.is_val(doc) else "train"
            finished = writers[name].write(ids)
            stats[name]["bytes"] += piece.nbytes
            if piece.last or plan.per_piece:
                finished += writers[name].write(eot)
                stats[name]["documents"] += 1
                doc += 1
            index += 1
            if finished:
                checkpoint(index)
            bar.update(piece.nbytes)
    shards = {n: writers[n].close() for n in names}
    for name in names:
        if not stats[name]["documents"]:
            (out_dir / STATE_NAME).unlink(missing_ok=True)
            raise SamoutError(f"nothing fell into the {name} split ({doc} units, --val-fraction "
                              f"{val_fraction}): give more documents or another --val-fraction")
    splits = {n: {"shards": shards[n], "tokens": sum(s["tokens"] for s in shards[n]), **stats[n]}
              for n in names}
    meta = {
        "format": DATA_FORMAT,
        "version": DATA_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "pad_id": PAD_ID,
        "eot_id": EOT_ID,
        "shard_tokens": shard_tokens,
        "split": {"seed": seed, "val_fraction": val_fraction, "unit": plan.unit, "rule": plan.rule},
        "splits": splits,
        "sources": corpus.records,
    }
    if sample_info is not None:
        meta["tokenizer_sample"] = sample_info
    atomic_write(out_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    return meta
