"""The training loop: `Trainer.fit()` runs a run that `samout.training.setup.train(...)` set up.

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
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from samout.data.dataset import TokenData
from samout.device import resolve_device
from samout.errors import SamoutError
from samout.evaluation import evaluate
from samout.run_dir import (
    save_checkpoint,
)
from samout.tokenizer import (
    load_tokenizer,
    token_byte_lengths,
)
from samout.training import distributed as dist_utils
from samout.training import fsdp, objectives, step
from samout.training.config import TrainConfig
from samout.training.init_from import load_init_model
from samout.training.progress import Progress
from samout.training.rng import rng_state, set_rng_state
from samout.training.run_log import RunLog, write_error
from samout.training.schedule import build_scheduler
from samout.training.signals import StopSignals


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
        self.optimizer = step.build_optimizer(self.raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                              betas=(cfg.beta1, cfg.beta2), fused=not self.fsdp)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.token_bytes = token_byte_lengths(load_tokenizer(data.tokenizer_path))
        self.step = 0  # optimizer steps done (skipped non-finite steps included)
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.bad_steps = 0  # consecutive skipped steps
        self.signals = StopSignals()
        self.run_log = RunLog(self.run_dir, enabled=self.is_main)
        self.last_eval: dict[str, float] | None = None
        self.last_metrics: dict[str, float] = {}
        reference = None
        if cfg.objective == "dpo" or (cfg.objective == "grpo" and cfg.kl_beta > 0):
            reference = load_init_model(cfg.init_from, data).to(self.device)
        self.objective = objectives.build_objective(cfg, data, reference)

    # -- state for checkpoints -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective under DDP (gathers every rank's RNG state): call it on every rank."""
        rngs = dist_utils.gather_objects(rng_state())
        objective_states = dist_utils.gather_objects(
            self.objective.state_dict() if hasattr(self.objective, "state_dict") else {})
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
            # GRPO: every rank's rollouts kept for the remaining --grpo-iterations steps, in
            # rank order (each rank samples its own prompts), like the RNG states.
            "objective_per_rank": objective_states,
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
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(self._own_objective_state(state))

    def _own_objective_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's objective state (GRPO's kept rollouts). Saved with another number of
        processes, the ranks' prompts differ: nothing is kept and the rollouts are sampled
        again. Checkpoints before `objective_per_rank` held rank 0's alone, under `objective`."""
        per_rank = state.get("objective_per_rank")
        if per_rank is None:
            per_rank = [state.get("objective", {})]
        return per_rank[self.rank] if len(per_rank) == self.world_size else {}

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
                error = write_error(self.run_dir, self.step, err)
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
        if self.signals.requested:
            return f"interrupted by {self.signals.name()}"
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
            sig, self.elapsed = dist_utils.all_reduce([float(self.signals.signum or 0), self.elapsed],
                                                      op="max", device=self.device)
            self.signals.signum = int(sig) or None

    def _check_replicas(self) -> None:
        """DDP keeps the replicas identical by construction; check it (one hash per rank) and
        record it in the log, since a silent divergence would make the saved model rank 0's alone."""
        digests = dist_utils.gather_objects(dist_utils.parameter_digest(self.raw_model))
        self.log({"type": "replicas", "step": self.step, "param_sha256": digests})
        if len(set(digests)) != 1:
            raise SamoutError(f"the ranks' weights diverged by step {self.step} (parameter hashes differ): "
                              "this is a bug, please report it")

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
        self.run_log.append(record, self.step)

    # -- the loop --------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until a stopping rule; returns a summary. SIGINT/SIGTERM end the current step,
        save a checkpoint and return with `signal` set (the CLI exits 128 + signal)."""
        with self.signals:
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_log.truncate_after(self.step)
        progress = Progress(cfg.max_steps, self.step, enabled=not self.quiet)
        window_tokens, window_start = 0, time.perf_counter()
        last_saved = self.step if self.step else None
        self._sync_stop()
        reason = self.stop_reason()
        while reason is None:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.elapsed += time.perf_counter() - t0
            window_tokens += cfg.tokens_per_step * self.world_size
            lr = self.scheduler.get_last_lr()[0]
            fields = dict(loss=f"{loss:.3f}", lr=f"{lr:.2e}")  # speed and time left: at log steps
            if self.step % cfg.log_every == 0 or self.step == 1:
                tok_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_tokens, window_start = 0, time.perf_counter()
                self.log({"type": "train", "step": self.step, "loss": loss, "lr": lr,
                          "tokens": self.tokens_seen, "tokens_per_s": tok_s, "elapsed": self.elapsed,
                          **self.last_metrics})
                fields.update(tok_s=f"{tok_s:,.0f}", eta=self._eta(tok_s))
            progress.update(self.step, **fields)
            self._sync_stop()
            reason = self.stop_reason()
            if self.step % cfg.eval_every == 0 or reason is not None:
                model = self.full_model() if not self.signals.requested else None
                if self.is_main and not self.signals.requested:  # an interrupted run saves, no eval
                    ev = self.evaluate(model)
                    self.log({"type": "eval", "step": self.step, **ev, "tokens": self.tokens_seen})
                    progress.write(f"step {self.step}: train loss {loss:.4f}, " + ", ".join(
                        f"{k.replace('_', ' ')} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
                        + f", {self.elapsed:.0f}s")
                dist_utils.barrier()
            if self.step % cfg.save_every == 0 or reason is not None:
                self.save()
                last_saved = self.step
        progress.close()
        if last_saved != self.step:
            self.save()
        if self.world_size > 1 and not self.fsdp:
            self._check_replicas()
        self.run_log.plot()
        return {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed, "stop_reason": reason,
                "signal": self.signals.signum, **(self.last_eval or {})}
