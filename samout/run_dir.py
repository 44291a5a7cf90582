"""The run directory: every file name, how each file is written, and how a model is loaded
back. The one module that knows the layout (README "The run directory"):

    RUN_DIR/
      config.json            model config (model_type, sizes)        } the latest model: a
      model.safetensors      weights                                 } model directory any
      tokenizer.json         byte-level BPE                          } samout tool loads
      tokenizer_config.json  (optional) chat template, HF style
      checksums.json         SHA-256 and size of the files above, written last
      train_config.json      the run's training settings and data directory
      log.jsonl, loss.png    the run log and its plot
      checkpoints/step-XXXXXX/   a model directory + training_state.pt + checksums.json

Files are written under a temporary name and renamed into place, so a crash never leaves
a half-written file under the real name; they get the usual permissions (0666 minus the
umask). `checksums.json` is the commit point of a set of files: loading verifies it, so a
truncated or corrupted file, or a set from two different saves, is reported instead of
loaded, and `load_model` then falls back to the newest checkpoint whose model files are
intact. Loading for inference reads the model files only: never `training_state.pt`
(optimizer state) and never `samout.training`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from samout.device import resolve_device
from samout.errors import SamoutError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHECKSUMS_NAME = "checksums.json"
TRAIN_CONFIG_NAME = "train_config.json"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINING_STATE_NAME = "training_state.pt"
CORRUPT_PREFIX = "corrupt-"
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


def _temporary(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _file_mode())
    return fd, tmp


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = _temporary(path)
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


# -- model files -----------------------------------------------------------------
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
    """`config.json` and `model.safetensors` of `model` into `directory`."""
    directory = Path(directory)
    tensors = state_dict_for_saving(model)
    fd, tmp = _temporary(directory / WEIGHTS_NAME)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "model_type": config.model_type})
        os.chmod(tmp, _file_mode())  # save_file writes a new file of its own
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
    return _read_json_object(path)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_model_weights(cls, directory: str | Path, map_location: str | torch.device = "cpu"):
    """Build `cls(config)` from `directory/config.json` and load its safetensors weights.

    The file is parsed on the CPU, so a failure there is the file's fault (corruption), and
    only then moved to `map_location`: a device that cannot be used is reported as such,
    never as a corrupted checkpoint."""
    directory = Path(directory)
    device = resolve_device(str(map_location))
    data = read_config_dict(directory)
    try:
        config = cls.config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint in {directory}: {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as err:
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
    return model.to(device)


def write_model_dir(directory: str | Path, model: torch.nn.Module, tokenizer_path: str | Path) -> list[str]:
    """A model directory: the model's config.json and model.safetensors, tokenizer.json, and
    the Hugging Face files that make it loadable by path (samout.remote_code). Returns the
    names to list in checksums.json."""
    from samout.remote_code import write_hf_files  # it imports this module

    model.save_pretrained(directory)
    atomic_write(Path(directory) / TOKENIZER_NAME, Path(tokenizer_path).read_bytes())
    return MODEL_FILES + write_hf_files(directory)


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
def _load_exactly(directory: Path, device: str | torch.device, verify: bool,
                  dtype: str = "float32") -> torch.nn.Module:
    from samout.models import MODEL_CLASSES  # the models import this module

    if verify and directory.is_dir():
        verify_checksums(directory, names=MODEL_FILES)
    model_type = read_config_dict(directory).get("model_type", "samout")
    if model_type not in MODEL_CLASSES:
        raise CheckpointError(
            f"{directory}: unknown model_type {model_type!r} (known: {', '.join(MODEL_CLASSES)})"
        )
    model = MODEL_CLASSES[model_type].from_pretrained(directory, map_location=device)
    if dtype != "float32":
        from samout.quant import convert_for_inference

        model = convert_for_inference(model, dtype)
    return model


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


def load_model(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
               fallback: bool = True, dtype: str = "float32") -> torch.nn.Module:
    """The model `path/config.json` describes, on `device` ("auto" picks CUDA if available).

    `verify`: check `checksums.json` where the directory has one. `fallback`: when the
    top-level files of a run do not verify, load its newest intact checkpoint instead (the
    top-level set is replaced file by file; the checkpoints are whole). `dtype` "bfloat16"
    or "int8" converts it for inference (samout.quant.convert_for_inference)."""
    path = Path(path)
    device = resolve_device(str(device))
    if fallback:
        path = resolve_model_dir(path, verify)
        verify = False  # just done
    return _load_exactly(path, device, verify, dtype)


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` of a run or model directory (or a tokenizer.json file)."""
    from samout.tokenizer import load_tokenizer as load

    return load(path)


def check_model_dir(path: str | Path) -> Path:
    """`path` as a directory that holds a model, or a SamoutError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise SamoutError(f"run directory not found: {path}")
    if not (path / CONFIG_NAME).is_file():
        raise SamoutError(f"no checkpoint in {path} ({CONFIG_NAME} is missing): train a model there first")
    return path


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a run or model directory, falling back to the newest intact
    checkpoint like `load_model`; the tokenizer comes from the same directory as the model."""
    path = check_model_dir(path)
    device = resolve_device(str(device))
    directory = resolve_model_dir(path)
    model = _load_exactly(directory, device, verify=False, dtype=dtype)
    return model, load_tokenizer(directory / TOKENIZER_NAME)


# -- the run's own files ---------------------------------------------------------
def read_train_config(run_dir: str | Path) -> dict[str, Any]:
    """The training settings saved in `run_dir/train_config.json` ({} if there are none)."""
    path = Path(run_dir) / TRAIN_CONFIG_NAME
    return _read_json_object(path) if path.is_file() else {}


def write_train_config(run_dir: str | Path, settings: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / TRAIN_CONFIG_NAME, json.dumps(settings, indent=2) + "\n")
