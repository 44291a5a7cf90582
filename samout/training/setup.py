"""Setting a training run up: `train(...)` resolves the settings (new run, `--resume` or
`--init-from`), builds the model and the data, writes the run's settings and hands a
`Trainer` (samout/training/trainer.py, the loop) the work. Started by `torchrun`, every
process calls it and they train one model data-parallel.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from samout.device import resolve_device
from samout.errors import SamoutError
from samout.files import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, CheckpointError, atomic_write
from samout.models import MODEL_CLASSES
from samout.run_dir import (
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_train_config,
    remove_partial_checkpoints,
    set_aside,
    write_train_config,
)
from samout.tokenizer import (
    read_tokenizer_config,
    update_tokenizer_config,
)
from samout.training import distributed as dist_utils
from samout.training import objectives
from samout.training.config import TrainConfig, check_same_model, load_config_file, resolve_settings
from samout.training.init_from import load_init_model
from samout.training.trainer import Trainer


def _saved_objective(run_dir: Path, resume: bool) -> str:
    """The objective a resumed run was trained with (its train_config.json), else lm."""
    if not resume:
        return "lm"
    try:
        return read_train_config(run_dir).get("objective", "lm")
    except CheckpointError:  # an unreadable file: the checkpoint's own settings decide later
        return "lm"


def train(data_dir: str | Path, run_dir: str | Path, *, preset: str | None = None,
          config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
          model_overrides: dict[str, Any] | None = None, resume: bool = False,
          quiet: bool = False) -> dict[str, Any]:
    """Train a model on a prepared data directory into `run_dir` (or continue it with `resume`).

    `overrides` are TrainConfig fields (they win over the config file and, on resume,
    over the saved settings); `model_overrides` are model config fields. Started by
    `torchrun`, every process calls this and they train one model data-parallel.
    """
    env = dist_utils.env_from_environment()
    try:
        result = _train(data_dir, run_dir, env, preset=preset, config_file=config_file, overrides=overrides,
                        model_overrides=model_overrides, resume=resume, quiet=quiet or not env.is_main)
        # Every rank waits for the others (rank 0 may still be writing the checkpoint) before the
        # group goes: a gloo rank torn down while a peer is still busy can abort in C++
        # ("terminate called without an active exception"), failing a finished run.
        dist_utils.barrier()
        return result
    finally:
        dist_utils.shutdown()


def _train(data_dir, run_dir, env: dist_utils.DistEnv, *, preset, config_file, overrides, model_overrides,
           resume, quiet) -> dict[str, Any]:
    run_dir = Path(run_dir)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = objectives.load_data(data_dir, overrides.get("objective") or _saved_objective(run_dir, resume))
    if resume:
        if not list_checkpoints(run_dir):
            raise SamoutError(f"no checkpoint in {run_dir} to resume from: train without --resume first")
        try:
            checkpoint, state, skipped = find_resumable(run_dir)
        except CheckpointError as err:
            raise SamoutError(f"cannot resume: {err}") from None
        file_model, file_train = load_config_file(config_file) if config_file else ({}, {})
        cfg = TrainConfig.from_dict({**state["train_config"], **file_train, **overrides})
        data.check_seq_len(cfg.seq_len)
        model = load_model(checkpoint, verify=False, fallback=False)  # verified just above
        check_same_model(model.config, {**file_model, **(model_overrides or {})}, preset)
        if model.config.vocab_size != data.vocab_size:
            raise SamoutError(f"{data_dir} has vocab {data.vocab_size} but the run's model has "
                              f"{model.config.vocab_size}: resume with the data it was trained on")
    else:
        if latest_checkpoint(run_dir) is not None:
            raise SamoutError(f"{run_dir} already holds a run (up to {latest_checkpoint(run_dir).name}): "
                              "add --resume to continue it, or choose another --out")
        if run_dir.exists() and not run_dir.is_dir():
            raise SamoutError(f"--out {run_dir} exists and is not a directory")
        file_model, file_train = load_config_file(config_file) if config_file else ({}, {})
        cfg, model_type, model_config = resolve_settings(file_model, file_train, overrides, model_overrides,
                                                         preset, data.vocab_size, bool(config_file))
        data.check_seq_len(cfg.seq_len)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.init_from is not None:
            model = load_init_model(cfg.init_from, data, {**file_model, **(model_overrides or {})}, preset,
                                    quiet=quiet)
        else:
            model = MODEL_CLASSES[model_type](model_config)

    resolve_device(cfg.device)  # an unavailable device is one line, before any work
    env, device = dist_utils.init_distributed(cfg.device)
    if env.enabled:
        cfg = dataclasses.replace(cfg, device=device)
        # Every rank must have picked the same checkpoint (they read the same files).
        if resume and dist_utils.gather_objects(checkpoint.name) != [checkpoint.name] * env.world_size:
            raise SamoutError("the ranks found different checkpoints to resume from: is RUN_DIR shared?")
    elif cfg.fsdp:
        raise SamoutError("--fsdp needs several processes: start with torchrun --nproc_per_node=N")
    trainer = Trainer(model, data, cfg, run_dir, rank=env.rank, world_size=env.world_size, quiet=quiet)
    if resume:
        if env.is_main:
            remove_partial_checkpoints(run_dir)
            for bad, why in skipped:
                moved = set_aside(bad)
                print(f"warning: skipped checkpoint {bad.name} ({why}); moved it to {moved.name}",
                      file=sys.stderr)
        trainer.load_state_dict(state)
        saved_world = state.get("data_position", {}).get("world_size", 1)
        if saved_world != env.world_size and env.is_main:
            print(f"warning: the run was saved with {saved_world} process(es), now {env.world_size}: "
                  "the global batch changes, so this is not an exact continuation", file=sys.stderr)
        if not quiet:
            print(f"resuming {run_dir} from {checkpoint.name} (step {trainer.step})")
    elif not quiet:
        n = model.num_parameters()
        ranks = f" x {env.world_size} processes" if env.enabled else ""
        print(f"training {model_type} ({n:,} parameters) on {data.dir}: {cfg.tokens_per_step:,} "
              f"tokens/step{ranks}, up to {cfg.max_steps} steps, device {trainer.device}")
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_train_config(run_dir, {**cfg.to_dict(), "data_dir": str(data.dir.resolve())})
            if not (run_dir / TOKENIZER_NAME).exists():
                atomic_write(run_dir / TOKENIZER_NAME, data.tokenizer_path.read_bytes())
            config_file_path = data.tokenizer_path.with_name(TOKENIZER_CONFIG_NAME)
            if config_file_path.is_file():  # the chat template travels with the tokenizer
                update_tokenizer_config(run_dir, **read_tokenizer_config(data.dir))
        except OSError as err:
            error = f"cannot write to {err.filename or run_dir}: {err.strerror or err}"
        else:
            error = None
    else:
        error = None
    error = dist_utils.broadcast_object(error)
    if error:
        raise SamoutError(error)
    return trainer.fit()
