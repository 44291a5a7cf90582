"""Model checkpoints as standard files: `config.json` + `model.safetensors`.

Files are written under a temporary name and renamed into place, so a crash never
leaves a half-written file under the real name.
"""

from __future__ import annotations

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
