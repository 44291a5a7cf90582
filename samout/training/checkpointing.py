"""Training checkpoints: RUN_DIR/checkpoints/step-XXXXXX/ directories and the latest model
at the RUN_DIR top level.

A checkpoint directory holds config.json, model.safetensors and tokenizer.json (a model
directory any samout tool loads) plus training_state.pt: optimizer, scheduler, RNG
states, step, tokens seen and the training config, and checksums.json (SHA-256 of each
file). It is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint under a real name; loading verifies the checksums, so
later damage (a truncated copy, a bad disk) is reported, and `find_resumable` falls back
to the newest checkpoint that verifies.

The top-level model files are replaced one by one and their checksums.json last: it is
the commit point. A crash in between leaves files that do not match it, which loading
detects (`samout generate/eval` then fall back to the newest good checkpoint).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samout.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    verify_checksums,
    write_checksums,
)
from samout.remote_code import write_hf_files
from samout.tokenizer import TOKENIZER_NAME

CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_NAME = "training_state.pt"
MODEL_FILES = [CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME]
CORRUPT_PREFIX = "corrupt-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_model_dir(directory: Path, model: torch.nn.Module, tokenizer_path: Path) -> list[str]:
    """Write the model files; returns the names to list in checksums.json."""
    model.save_pretrained(directory)
    atomic_write(directory / TOKENIZER_NAME, Path(tokenizer_path).read_bytes())
    return MODEL_FILES + write_hf_files(directory)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer_path: Path,
                    training_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-XXXXXX, update the top-level model, keep the newest `keep`.

    On any failure (full disk, read-only directory) the partial temporary directory is
    removed and the error propagates; checkpoints already written are left untouched.
    """
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        names = _write_model_dir(tmp, model, tokenizer_path)
        buffer = tmp / f".{TRAINING_STATE_NAME}.tmp"
        torch.save(training_state, buffer)
        os.replace(buffer, tmp / TRAINING_STATE_NAME)
        write_checksums(tmp, names + [TRAINING_STATE_NAME])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved again (e.g. at the end of a resumed run)
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    names = _write_model_dir(run_dir, model, tokenizer_path)
    write_checksums(run_dir, names)  # last: the commit point of the top-level set
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINING_STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, ...
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is corrupted or truncated: {why}") from None


def verify_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Check a checkpoint directory's checksums and return its training state."""
    verify_checksums(checkpoint, required=True)
    return load_training_state(checkpoint)


def find_resumable(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """(newest checkpoint that verifies, its training state, [(skipped newer one, why)]).

    Raises CheckpointError when the run has checkpoints but none verifies, and
    FileNotFoundError when it has none.
    """
    skipped: list[tuple[Path, str]] = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            return checkpoint, verify_checkpoint(checkpoint), skipped
        except CheckpointError as err:
            skipped.append((checkpoint, str(err)))
    if skipped:
        raise CheckpointError(f"no checkpoint of {run_dir} is intact (newest: {skipped[0][1]})")
    raise FileNotFoundError(run_dir)


def set_aside(checkpoint: Path) -> Path:
    """Rename a bad checkpoint to corrupt-step-XXXXXX so it is neither resumed nor pruned by
    step order (kept for inspection; delete it when done)."""
    target = checkpoint.with_name(CORRUPT_PREFIX + checkpoint.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(checkpoint, target)
    return target
