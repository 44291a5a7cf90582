"""Every file name samout writes, and how a file is written and checked: atomically, with
SHA-256 checksums, JSON read with clear errors. A leaf: it imports nothing else from samout,
so models, tokenizers and the run directory all build on it without depending on each other.

Files are written under a temporary name and renamed into place, so a crash never leaves
a half-written file under the real name; they get the usual permissions (0666 minus the
umask). `checksums.json` is the commit point of a set of files: loading verifies it, so a
truncated or corrupted file, or a set from two different saves, is reported instead of
loaded. The layout of a run directory, and what is loaded from where: `samout.run_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A model directory (what inference reads).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # Hugging Face's: chat template, auto_map
# The seed author's vocabulary, held instead of tokenizer.json (`samout convert openash`).
VOCAB_NAME = "openash_vocab.json"
CHECKSUMS_NAME = "checksums.json"
# A run directory: a model directory plus these.
TRAIN_CONFIG_NAME = "train_config.json"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINING_STATE_NAME = "training_state.pt"
CORRUPT_PREFIX = "corrupt-"
# A data directory (`samout prepare`).
META_NAME = "meta.json"
# The files of a model directory (what inference reads, and what a checkpoint's checksums cover
# besides the training state).
MODEL_FILES = [CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupted or from an incompatible version."""


# -- writing files ---------------------------------------------------------------
def _file_mode() -> int:
    """0666 minus the process umask: what `open(path, "w")` would give (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temporary(path: Path, private: bool = False) -> tuple[int, str]:
    if not private:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    if not private:
        os.fchmod(fd, _file_mode())
    return fd, tmp


def atomic_write(path: str | Path, data: bytes | str, private: bool = False) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename.
    private: the file is the owner's alone (0600) and the directory must exist already
    (by default a missing directory is created and the file gets the umask's mode)."""
    path = Path(path)
    fd, tmp = _temporary(path, private)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Like `atomic_write` for a writer that creates the file itself (`write(temporary_path)`,
    e.g. safetensors' `save_file`)."""
    path = Path(path)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # the writer made a new file of its own
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- checksums -------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | Path, names: list[str]) -> None:
    """Record SHA-256 and size of `names` in `directory/checksums.json` (atomically, last)."""
    directory = Path(directory)
    files = {name: {"sha256": file_sha256(directory / name), "bytes": (directory / name).stat().st_size}
             for name in sorted(names)}
    text = json.dumps({"algorithm": "sha256", "files": files}, indent=2) + "\n"
    atomic_write(directory / CHECKSUMS_NAME, text)


def verify_checksums(directory: str | Path, required: bool = False, names: list[str] | None = None) -> bool:
    """Check the files listed in `directory/checksums.json` (only those in `names`, if given);
    raise CheckpointError naming the first bad file. Returns False (nothing checked) when there
    is no checksum file and it is not `required` (a model directory written by hand or by
    `save_pretrained`)."""
    directory = Path(directory)
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing: the checkpoint was not completely written")
        return False
    try:
        files = json.loads(path.read_text())["files"]
        entries = [(str(name), int(info["bytes"]), str(info["sha256"])) for name, info in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{path} is corrupted (not a valid checksum file)") from None
    for name, size, sha in entries:
        if names is not None and name not in names:
            continue
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {CHECKSUMS_NAME})")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} is truncated or corrupted: {file.stat().st_size} bytes, "
                                  f"{CHECKSUMS_NAME} says {size}")
        if file_sha256(file) != sha:
            raise CheckpointError(f"{file} is corrupted or from another save: its SHA-256 does not match "
                                  f"{CHECKSUMS_NAME}")
    return True


# -- reading JSON ----------------------------------------------------------------
def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; CheckpointError when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_config_dict(directory: str | Path) -> dict[str, Any]:
    """A model directory's `config.json`; CheckpointError when the directory or file is missing."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise CheckpointError(f"not a directory: {directory}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {directory}: {CONFIG_NAME} is missing")
    return read_json_object(path)
