"""The run directory: its layout, checkpoints and resuming, and loading a model back with
fallback (README "The run directory"). The file names, atomic writes and checksums are
`samout.files`; a model's own files are written and read by its class (`save_pretrained`,
`from_pretrained`).

    RUN_DIR/
      config.json            model config (model_type, sizes)        } the latest model: a
      model.safetensors      weights                                 } model directory any
      tokenizer.json         byte-level BPE                          } samout tool loads
      tokenizer_config.json  (optional) chat template, HF style
      checksums.json         SHA-256 and size of the files above, written last
      train_config.json      the run's training settings and data directory
      log.jsonl, loss.png    the run log and its plot
      checkpoints/step-XXXXXX/   a model directory + training_state.pt + checksums.json

`checksums.json` is the commit point of a set of files: loading verifies it, and `load_model`
falls back to the newest checkpoint whose model files are intact when a run's top-level set
was cut short. Loading for inference reads the model files only: never `training_state.pt`
(optimizer state) and never `samout.training`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from samout.device import resolve_device
from samout.errors import SamoutError
from samout.files import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    CHECKSUMS_NAME,
    CONFIG_NAME,
    CORRUPT_PREFIX,
    LOG_NAME,
    MODEL_FILES,
    PLOT_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    TRAIN_CONFIG_NAME,
    TRAINING_STATE_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    file_sha256,
    read_config_dict,
    read_json_object,
    verify_checksums,
    write_checksums,
)
from samout.models import load_pretrained
from samout.models.base import load_model_weights, save_model_weights, state_dict_for_saving
from samout.openash_tokenizer import OpenAshVocab
from samout.remote_code import hf_files_in
from samout.tokenizer import load_tokenizer

# Re-exported for one release (deprecated): import these from samout.files (names, atomic
# writes, checksums) and samout.models.base (a model's weights) instead.
__all__ = [
    "CHECKPOINTS_DIR", "CHECKPOINT_PREFIX", "CHECKSUMS_NAME", "CONFIG_NAME", "CORRUPT_PREFIX", "LOG_NAME",
    "MODEL_FILES", "PLOT_NAME", "TOKENIZER_CONFIG_NAME", "TOKENIZER_NAME", "TRAINING_STATE_NAME",
    "TRAIN_CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "atomic_write", "file_sha256",
    "load_model_weights", "read_config_dict", "save_model_weights", "state_dict_for_saving",
    "verify_checksums", "write_checksums",
    # the run's own API
    "check_model_dir", "checkpoint_dir", "find_resumable", "latest_checkpoint", "list_checkpoints", "load",
    "load_model", "load_run", "load_tokenizer", "load_training_state", "newest_intact_checkpoint",
    "read_train_config", "remove_partial_checkpoints", "resolve_model_dir", "save_checkpoint", "set_aside",
    "verify_checkpoint", "write_model_dir", "write_train_config",
]


def write_model_dir(directory: str | Path, model: nn.Module, tokenizer_path: str | Path) -> list[str]:
    """A model directory: tokenizer.json, then the model's config.json and model.safetensors
    and the Hugging Face files that make it loadable by path (written once, by the model's
    `save_pretrained`, which finds the tokenizer already there). Returns the names to list in
    checksums.json."""
    atomic_write(Path(directory) / TOKENIZER_NAME, Path(tokenizer_path).read_bytes())
    model.save_pretrained(directory)
    return MODEL_FILES + hf_files_in(directory)


# -- checkpoints -----------------------------------------------------------------
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    n = len(CHECKPOINT_PREFIX)
    found = [p for p in root.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[n:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[n:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer_path: str | Path,
                    training_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-XXXXXX, update the top-level model, keep the newest `keep`.

    The checkpoint is written under a temporary name and renamed into place. The top-level
    model files are replaced one by one and their checksums.json last: a crash in between
    leaves files that do not match it, which loading detects (and falls back). On any failure
    (full disk, read-only directory) the partial temporary directory is removed and the error
    propagates; checkpoints already written are left untouched.
    """
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        names = write_model_dir(tmp, model, tokenizer_path)
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
    names = write_model_dir(run_dir, model, tokenizer_path)
    write_checksums(run_dir, names)  # last: the commit point of the top-level set
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Leftovers of a save cut short by a crash (never loaded: not step-* names)."""
    for partial in (Path(run_dir) / CHECKPOINTS_DIR).glob(f".*-{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def load_training_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's training_state.pt (optimizer, scheduler, RNG, step): for resuming only."""
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


def newest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose model files match its checksums (training state not read)."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checksums(checkpoint, required=True, names=MODEL_FILES)
            return checkpoint
        except CheckpointError:
            continue
    return None


def set_aside(checkpoint: Path) -> Path:
    """Rename a bad checkpoint to corrupt-step-XXXXXX so it is neither resumed nor pruned by
    step order (kept for inspection; delete it when done)."""
    target = checkpoint.with_name(CORRUPT_PREFIX + checkpoint.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(checkpoint, target)
    return target


# -- loading ---------------------------------------------------------------------
def resolve_model_dir(path: str | Path, verify: bool = True) -> Path:
    """The directory to load a model from: `path` itself if its model files are intact,
    else (a run whose top-level set was cut short) its newest intact checkpoint, with a
    warning on stderr. Raises CheckpointError when neither is usable."""
    path = Path(path)
    if not verify:
        return path
    try:
        verify_checksums(path, names=MODEL_FILES) if path.is_dir() else read_config_dict(path)
        return path
    except CheckpointError as err:
        fallback = newest_intact_checkpoint(path)
        if fallback is None:
            raise
        print(f"warning: {err}; loading {fallback} instead", file=sys.stderr)
        return fallback


def check_model_dir(path: str | Path) -> Path:
    """`path` as a directory that holds a model, or a SamoutError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise SamoutError(f"run directory not found: {path}")
    if not (path / CONFIG_NAME).is_file():
        raise SamoutError(f"no checkpoint in {path} ({CONFIG_NAME} is missing): train a model there first")
    return path


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32", verify: bool = True,
         fallback: bool = True) -> tuple[nn.Module, Tokenizer | OpenAshVocab]:
    """(model, tokenizer) from a run or model directory: the one loader of samout
    (`samout.load`; generate, eval, chat, serve and export use it).

    `device`: "cpu", "cuda", "auto" (CUDA if available), ... `dtype`: "float32", or
    "bfloat16" / "int8" to convert the model for inference (samout.quant). `verify`: check
    `checksums.json` where the directory has one. `fallback`: when the top-level files of a
    run do not verify, load its newest intact checkpoint instead, with a warning (the
    top-level set is replaced file by file; the checkpoints are whole). The tokenizer
    (tokenizer.json, or an OpenASH vocabulary) comes from the same directory as the model.
    Never reads optimizer state. Raises SamoutError when `path` holds no model and
    CheckpointError when no intact one is found."""
    path = check_model_dir(path)
    model, directory = _load_model(path, device, verify, fallback, dtype)
    return model, load_tokenizer(directory / TOKENIZER_NAME)


def load_model(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
               fallback: bool = True, dtype: str = "float32") -> nn.Module:
    """The model `path/config.json` describes, without its tokenizer (`samout.load_model`);
    the options are those of `load`. Raises CheckpointError when `path` is not a directory
    holding an intact model (and, with `fallback`, has no intact checkpoint either)."""
    return _load_model(Path(path), device, verify, fallback, dtype)[0]


def _load_model(path: Path, device: str | torch.device, verify: bool, fallback: bool,
                dtype: str) -> tuple[nn.Module, Path]:
    device = resolve_device(str(device))  # first: a device error is never called corruption
    if fallback:
        path = resolve_model_dir(path, verify)
        verify = False  # just done
    return load_pretrained(path, map_location=device, verify=verify, dtype=dtype), path


def load_run(path: str | Path, device: str | torch.device = "cpu",
             dtype: str = "float32") -> tuple[nn.Module, Tokenizer | OpenAshVocab]:
    """Deprecated alias of `load` (samout.load), kept for one release."""
    return load(path, device, dtype)


# -- the run's own files ---------------------------------------------------------
def read_train_config(run_dir: str | Path) -> dict[str, Any]:
    """The training settings saved in `run_dir/train_config.json` ({} if there are none)."""
    path = Path(run_dir) / TRAIN_CONFIG_NAME
    return read_json_object(path) if path.is_file() else {}


def write_train_config(run_dir: str | Path, settings: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / TRAIN_CONFIG_NAME, json.dumps(settings, indent=2) + "\n")
