"""Model checkpoints as standard files: `config.json` + `model.safetensors`.

Files are written under a temporary name and renamed into place, so a crash never
leaves a half-written file under the real name. Directories written by training also
hold `checksums.json` (SHA-256 and size of each file), written last: it is the commit
point of the set, and loading verifies it, so a truncated or corrupted file, or a set
of files from two different saves, is reported instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from an incompatible version."""


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def verify_checksums(directory: str | Path, required: bool = False) -> bool:
    """Check every file listed in `directory/checksums.json`; raise CheckpointError naming the
    first bad file. Returns False (nothing checked) when there is no checksum file and it is
    not `required` (a model directory written by hand or by `save_pretrained`)."""
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


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied duplicates dropped (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)
        if hash(key) in seen:
            continue
        seen.add(hash(key))
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_model_weights(model: torch.nn.Module, config: Any, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_saving(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "model_type": config.model_type})
        os.replace(tmp, directory / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write(directory / CONFIG_NAME, config.to_json())


def read_config_dict(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise CheckpointError(f"not a directory: {directory}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {directory}: {CONFIG_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_model_weights(cls, directory: str | Path, map_location: str = "cpu"):
    """Build `cls(config)` from `directory/config.json` and load its safetensors weights."""
    directory = Path(directory)
    data = read_config_dict(directory)
    try:
        config = cls.config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint in {directory}: {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(weights, device=map_location)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{weights} is corrupted or truncated: {err}") from None
    model = cls(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied head is saved once; everything else must be present.
    missing = [k for k in missing if not (config.__dict__.get("tie_word_embeddings") and k == "head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}):"
            " it was written by another version of samout"
        )
    return model
