"""Training checkpoints: RUN_DIR/checkpoints/step-XXXXXX/ directories and the latest model
at the RUN_DIR top level.

A checkpoint directory holds config.json, model.safetensors and tokenizer.json (a model
directory any samout tool loads) plus training_state.pt: optimizer, scheduler, RNG
states, step, tokens seen and the training config. It is written under a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint under
a real name; the top-level files are each replaced atomically.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samout.checkpoint import atomic_write
from samout.tokenizer import TOKENIZER_NAME

CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_NAME = "training_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / TRAINING_STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


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


def _write_model_dir(directory: Path, model: torch.nn.Module, tokenizer_path: Path) -> None:
    model.save_pretrained(directory)
    atomic_write(directory / TOKENIZER_NAME, Path(tokenizer_path).read_bytes())


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer_path: Path,
                    training_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-XXXXXX, update the top-level model, keep the newest `keep`."""
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_model_dir(tmp, model, tokenizer_path)
    buffer = tmp / f".{TRAINING_STATE_NAME}.tmp"
    torch.save(training_state, buffer)
    buffer.replace(tmp / TRAINING_STATE_NAME)
    if final.exists():  # the same step saved again (e.g. at the end of a resumed run)
        shutil.rmtree(final)
    tmp.replace(final)
    _write_model_dir(run_dir, model, tokenizer_path)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / TRAINING_STATE_NAME, map_location="cpu", weights_only=True)
