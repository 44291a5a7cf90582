"""The training loop. `train(...)` sets a run up (new or resumed); `Trainer.fit()` runs it.

One optimizer step = `grad_accum` micro-batches. Batches are a pure function of
(seed, step, micro-step) (see `TokenData.train_batch`), and optimizer,
scheduler and RNG states are checkpointed, so a resumed run continues exactly as an
uninterrupted one would (see README "Crash safety and resume").

Under `torchrun` each process trains a DistributedDataParallel replica (or, with `--fsdp`,
an FSDP2 shard) on its slice of the global batch (`--batch-size` is per process); rank 0
alone evaluates, logs and writes checkpoints while the others wait. SIGINT/SIGTERM stop the run after the
current step with a checkpoint; a step with a non-finite loss or gradient is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from samout.checkpoint import CheckpointError, atomic_write
from samout.data.dataset import TokenData
from samout.errors import SamoutError
from samout.evaluation import evaluate
from samout.models import MODEL_CLASSES, load_pretrained
from samout.tokenizer import (
    PAD_ID,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    load_tokenizer,
    read_tokenizer_config,
    token_byte_lengths,
    update_tokenizer_config,
)
from samout.training import distributed as dist_utils
from samout.training import fsdp, objectives, step
from samout.training.checkpointing import (
    CHECKPOINTS_DIR,
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from samout.training.config import TrainConfig, load_config_file
from samout.training.init_from import load_init_model
from samout.training.schedule import build_scheduler

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
TRAIN_CONFIG_NAME = "train_config.json"
DEFAULT_PRESET = "small"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    return step.build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), fused=fused)


class NonFiniteError(SamoutError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    def __init__(self, model: torch.nn.Module, data: TokenData, cfg: TrainConfig, run_dir: str | Path,
                 *, rank: int = 0, world_size: int = 1, quiet: bool = False) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.quiet = quiet or not self.is_main
        self.device = resolve_device(cfg.device)
        self.raw_model = model.to(self.device)  # saved, evaluated; `self.model` runs the steps
        self.model = self.raw_model
        self.model_class = type(model)
        self.fsdp = cfg.fsdp and world_size > 1
        self.replicated: list[torch.nn.Parameter] = []  # FSDP: parameters it cannot shard
        if self.fsdp:
            self.replicated = fsdp.shard_model(self.raw_model)
        elif world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.raw_model, cfg, fused=not self.fsdp)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.token_bytes = token_byte_lengths(load_tokenizer(data.tokenizer_path))
        self.step = 0  # optimizer steps done (skipped non-finite steps included)
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.bad_steps = 0  # consecutive skipped steps
        self.stop_requested = False
        self.signal_received: int | None = None
        self.last_eval: dict[str, float] | None = None
        self.last_metrics: dict[str, float] = {}
        reference = None
        if cfg.objective == "dpo":
            reference = load_init_model(cfg.init_from, data).to(self.device)
        self.objective = objectives.build_objective(cfg, data, reference)

    # -- state for checkpoints -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective under DDP (gathers every rank's RNG state): call it on every rank."""
        rngs = dist_utils.gather_objects(rng_state())
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "bad_steps": self.bad_steps,
            "optimizer": (fsdp.optimizer_state(self.raw_model, self.optimizer) if self.fsdp
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "train_config": self.cfg.to_dict(),
            "data_dir": str(self.data.dir.resolve()),
            # Batches are a pure function of these (TokenData.train_batch): the data position.
            "data_position": {"next_step": self.step, "seed": self.cfg.seed, "world_size": self.world_size},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.bad_steps = state.get("bad_steps", 0)
        if self.fsdp:
            fsdp.load_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        set_rng_state(per_rank[self.rank] if len(per_rank) == self.world_size else state["rng"])

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes, the others wait). A write failure (full disk, read-only
        directory) becomes a SamoutError on every rank; earlier checkpoints stay intact."""
        state = self.state_dict()
        model = self.full_model()
        path, error = None, None
        if self.is_main:
            try:
                path = save_checkpoint(self.run_dir, self.step, model, self.data.tokenizer_path,
                                       state, self.cfg.keep_checkpoints)
            except OSError as err:
                error = _write_error(self.run_dir, self.step, err)
        error = dist_utils.broadcast_object(error)
        if error:
            raise SamoutError(error)
        return path

    # -- one optimizer step ----------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step; returns the loss averaged over micro-batches and ranks."""
        cfg = self.cfg
        self.model.train()
        self.scheduler.set_lr(self.step, self.tokens_seen, self.elapsed)
        total = 0.0
        metrics: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            # DDP averages gradients over ranks on the last micro-batch's backward only (FSDP2
            # reduce-scatters on each one: correct, with more communication).
            sync = self.world_size == 1 or self.fsdp or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss, extra = self.objective.micro_loss(self.model, self.step, micro, self.rank,
                                                        self.world_size, self.device, self.autocast_dtype)
                (loss / cfg.grad_accum).backward()
            total += loss.item()
            for key, value in extra.items():  # this rank's figures, averaged over micro-batches
                metrics[key] = metrics.get(key, 0.0) + value / cfg.grad_accum
        self.last_metrics = metrics
        if self.replicated:
            fsdp.average_replicated_grads(self.replicated)
        loss = dist_utils.all_reduce([total / cfg.grad_accum], device=self.device)[0] / self.world_size
        self._apply_update(loss)
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step * self.world_size
        return loss

    def _apply_update(self, loss: float) -> bool:
        """Clip and step; skip the step (weights and optimizer state untouched) when the loss
        or the gradient norm is not finite. Both are the same on every rank (the loss is
        all-reduced, the gradients are DDP-averaged), so all ranks decide alike."""
        grad_norm, finite = step.clip_and_step(self.raw_model.parameters(), self.optimizer,
                                               self.cfg.grad_clip, loss)
        if finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            self.log({"type": "skip", "step": self.step + 1, "loss": loss, "grad_norm": grad_norm,
                      "consecutive": self.bad_steps})
            if not self.quiet:
                print(f"warning: non-finite {what} at step {self.step + 1} (loss {loss}, grad norm "
                      f"{grad_norm}): step skipped ({self.bad_steps}/{self.cfg.max_bad_steps} in a row)",
                      file=sys.stderr)
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise NonFiniteError(
                    f"training stopped at step {self.step + 1}: {self.bad_steps} consecutive steps with a "
                    f"non-finite loss or gradient (weights kept from before them); lower --lr, use "
                    f"--dtype float32, or --resume from an earlier checkpoint "
                    f"(--max-bad-steps sets the limit)")
        return finite

    # -- stopping, evaluation, logging -----------------------------------------
    def stop_reason(self) -> str | None:
        cfg = self.cfg
        if self.stop_requested:
            name = signal.Signals(self.signal_received).name if self.signal_received else "a signal"
            return f"interrupted by {name}"
        if self.step >= cfg.max_steps:
            return f"reached max_steps={cfg.max_steps}"
        if cfg.max_tokens is not None and self.tokens_seen >= cfg.max_tokens:
            return f"reached max_tokens={cfg.max_tokens:,}"
        if cfg.max_time is not None and self.elapsed >= cfg.max_time:
            return f"reached max_time={cfg.max_time:g}s"
        return None

    def _sync_stop(self) -> None:
        """Agree over ranks on a stop request and on the clock (the LR schedule and
        max_time follow it), so every rank stops after the same step."""
        if self.world_size > 1:
            stop, sig, self.elapsed = dist_utils.all_reduce(
                [float(self.stop_requested), float(self.signal_received or 0), self.elapsed], op="max",
                device=self.device)
            self.stop_requested = bool(stop)
            self.signal_received = int(sig) or None

    def _check_replicas(self) -> None:
        """DDP keeps the replicas identical by construction; check it (one hash per rank) and
        record it in the log, since a silent divergence would make the saved model rank 0's alone."""
        digests = dist_utils.gather_objects(parameter_digest(self.raw_model))
        self.log({"type": "replicas", "step": self.step, "param_sha256": digests})
        if len(set(digests)) != 1:
            raise SamoutError(f"the ranks' weights diverged by step {self.step} (parameter hashes differ): "
                              "this is a bug, please report it")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.stop_requested:
            self.stop_requested, self.signal_received = True, signum
        # A second Ctrl-C aborts at once (KeyboardInterrupt); a repeated SIGTERM (torchrun sends
        # one to every worker when it is interrupted itself) does not cut the final save short.
        if signal.SIGINT in self._old_handlers:
            signal.signal(signal.SIGINT, self._old_handlers[signal.SIGINT])

    def _eta(self, tokens_per_s: float) -> str:
        """Time left until the nearest stopping rule (the bar's own ETA only knows steps)."""
        cfg = self.cfg
        rate = max(tokens_per_s, 1e-9)
        left = [(cfg.max_steps - self.step) * cfg.tokens_per_step * self.world_size / rate]
        if cfg.max_tokens is not None:
            left.append((cfg.max_tokens - self.tokens_seen) / rate)
        if cfg.max_time is not None:
            left.append(cfg.max_time - self.elapsed)
        seconds = max(0, int(min(left)))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def full_model(self) -> torch.nn.Module | None:
        """The whole model on rank 0 (under FSDP a gathered CPU copy: collective, call on every
        rank); None on the other ranks."""
        if self.fsdp:
            return fsdp.full_model_copy(self.raw_model, self.model_class)
        return self.raw_model if self.is_main else None

    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        model = self.raw_model if model is None else model
        device = next(model.parameters()).device
        if self.objective.evaluate is not None:  # sft/dpo: their own validation figures
            self.last_eval = self.objective.evaluate(model, device, self.autocast_dtype)
            return self.last_eval
        result = evaluate(model, self.data, self.token_bytes, self.cfg.seq_len,
                          max_windows=self.cfg.eval_windows, batch_size=self.cfg.batch_size,
                          device=device, autocast_dtype=self.autocast_dtype)
        self.last_eval = {"val_loss": result.loss, "val_bpb": result.bits_per_byte,
                          "val_ppl": result.perplexity}
        return self.last_eval

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            try:
                with (self.run_dir / LOG_NAME).open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise SamoutError(_write_error(self.run_dir, self.step, err, what=LOG_NAME)) from None

    def _truncate_log(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be redone)."""
        path = self.run_dir / LOG_NAME
        if self.is_main and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut short by a crash
            atomic_write(path, "".join(line + "\n" for line in kept))

    # -- the loop --------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until a stopping rule; returns a summary. SIGINT/SIGTERM end the current step,
        save a checkpoint and return with `signal` set (the CLI exits 128 + signal)."""
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._fit()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_log()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=True if self.quiet else None, dynamic_ncols=True)  # None: off if not a TTY
        window_tokens, window_start = 0, time.perf_counter()
        last_saved = self.step if self.step else None
        self._sync_stop()
        reason = self.stop_reason()
        while reason is None:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.elapsed += time.perf_counter() - t0
            window_tokens += cfg.tokens_per_step * self.world_size
            if self.step % cfg.log_every == 0 or self.step == 1:
                tok_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_tokens, window_start = 0, time.perf_counter()
                self.log({"type": "train", "step": self.step, "loss": loss,
                          "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens_seen,
                          "tokens_per_s": tok_s, "elapsed": self.elapsed, **self.last_metrics})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", eta=self._eta(tok_s),
                                refresh=False)
            bar.update(1)
            self._sync_stop()
            reason = self.stop_reason()
            if self.step % cfg.eval_every == 0 or reason is not None:
                model = self.full_model() if not self.stop_requested else None
                if self.is_main and not self.stop_requested:  # an interrupted run saves, no eval
                    ev = self.evaluate(model)
                    self.log({"type": "eval", "step": self.step, **ev, "tokens": self.tokens_seen})
                    if not self.quiet:  # also the progress report when stderr is not a terminal
                        bar.write(f"step {self.step}: train loss {loss:.4f}, " + ", ".join(
                            f"{k.replace('_', ' ')} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
                            + f", {self.elapsed:.0f}s")
                dist_utils.barrier()
            if self.step % cfg.save_every == 0 or reason is not None:
                self.save()
                last_saved = self.step
        bar.close()
        if last_saved != self.step:
            self.save()
        if self.world_size > 1 and not self.fsdp:
            self._check_replicas()
        if self.is_main:
            plot_losses(self.run_dir / LOG_NAME, self.run_dir / PLOT_NAME)
        return {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed, "stop_reason": reason,
                "signal": self.signal_received if self.stop_requested else None, **(self.last_eval or {})}


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the model's state dict (names and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_error(run_dir: Path, step: int, err: OSError, what: str = "checkpoint") -> str:
    where = err.filename or run_dir
    kept = latest_checkpoint(run_dir)
    previous = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
    return (f"could not write the {what} at step {step} to {where}: {err.strerror or err} "
            f"({previous}; free space or fix permissions, then --resume)")


def plot_losses(log_path: Path, out_path: Path) -> None:
    """Training and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)


def build_model_config(model_fields: dict[str, Any], vocab_size: int, preset: str | None):
    """The model's config: preset (if any) + fields, with the vocab taken from the tokenizer."""
    fields = dict(model_fields)
    model_type = fields.pop("model_type", "samout")
    if not isinstance(model_type, str) or model_type not in MODEL_CLASSES:
        raise SamoutError(f"unknown model_type {model_type!r}: choose one of {', '.join(MODEL_CLASSES)}")
    config_class = MODEL_CLASSES[model_type].config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(str(k) for k in set(fields) - known)
    if unknown:
        raise SamoutError(f"unknown setting(s) {', '.join(unknown)}: not a training setting nor a field "
                          f"of the {model_type} model config")
    if preset is not None and not isinstance(preset, str):
        raise SamoutError(f"preset must be a name, got {preset!r}")
    fields.update(vocab_size=vocab_size, padding_idx=PAD_ID)
    try:
        if preset is not None:
            return model_type, config_class.from_preset(preset, **fields)
        return model_type, config_class.from_dict(fields)
    except TypeError as err:
        raise SamoutError(f"bad model setting: {err}") from None


def resolve_settings(file_model: dict[str, Any], file_train: dict[str, Any], overrides: dict[str, Any],
                     model_overrides: dict[str, Any] | None, preset: str | None, vocab_size: int,
                     from_file: bool = False):
    """(TrainConfig, model_type, model config) of a new run from a config file's model and
    training fields, flags and a preset. Bad values raise SamoutError or ValueError only."""
    cfg = TrainConfig.from_dict({**file_train, **overrides})
    fields = {**file_model, **(model_overrides or {})}
    preset = preset or fields.pop("preset", None) or (None if from_file else DEFAULT_PRESET)
    fields.pop("preset", None)
    model_type, model_config = build_model_config(fields, vocab_size, preset)
    return cfg, model_type, model_config


def _check_same_model(config, fields: dict[str, Any], preset: str | None) -> None:
    """On resume the model comes from the checkpoint: model settings given again (the same
    command re-run with --resume) must describe that model; a change is an error, not ignored."""
    fields = dict(fields)
    preset = preset or fields.pop("preset", None)
    fields.pop("preset", None)
    if not fields and preset is None:
        return
    fields.setdefault("model_type", config.model_type)
    if fields["model_type"] != config.model_type:
        raise SamoutError(f"--resume cannot change the model: the run's model is {config.model_type}, "
                          f"not {fields['model_type']}")
    _, asked = build_model_config(fields, config.vocab_size, preset)
    have, want = config.to_dict(), asked.to_dict()
    diff = [f"{k} {have.get(k)!r} (asked {want[k]!r})" for k in want if want[k] != have.get(k)]
    if diff:
        raise SamoutError(f"--resume cannot change the model: the checkpoint has {', '.join(diff)}; "
                          "drop those settings or train a new run")


def _saved_objective(run_dir: Path, resume: bool) -> str:
    """The objective a resumed run was trained with (its train_config.json), else lm."""
    path = run_dir / TRAIN_CONFIG_NAME
    if resume and path.is_file():
        try:
            return json.loads(path.read_text()).get("objective", "lm")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return "lm"
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
        return _train(data_dir, run_dir, env, preset=preset, config_file=config_file, overrides=overrides,
                      model_overrides=model_overrides, resume=resume, quiet=quiet or not env.is_main)
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
        model = load_pretrained(checkpoint, verify=False)  # verified just above
        _check_same_model(model.config, {**file_model, **(model_overrides or {})}, preset)
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
            # Leftovers of a save cut short by a crash (never resumed from: not step-* names).
            for partial in (run_dir / CHECKPOINTS_DIR).glob(".*-step-*"):
                shutil.rmtree(partial, ignore_errors=True)
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
            atomic_write(run_dir / TRAIN_CONFIG_NAME,
                         json.dumps({**cfg.to_dict(), "data_dir": str(data.dir.resolve())}, indent=2) + "\n")
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
