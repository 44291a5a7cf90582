"""The training loop. `train(...)` sets a run up (new or resumed); `Trainer.fit()` runs it.

One optimizer step = `grad_accum` micro-batches. Batches are a pure function of
(seed, step, micro-step, rank) (see `TokenData.train_batch`), and optimizer,
scheduler and RNG states are checkpointed, so a resumed run continues exactly as an
uninterrupted one would. Places meant for later additions: `rank`/`world_size`
(distributed data parallel), `stop_requested` (set from a signal handler to stop
cleanly after the current step) and `_apply_update` (where a non-finite loss or
gradient can skip the step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from samout.checkpoint import atomic_write
from samout.data.dataset import TokenData
from samout.errors import SamoutError
from samout.evaluation import evaluate
from samout.models import MODEL_CLASSES, load_pretrained
from samout.tokenizer import PAD_ID, TOKENIZER_NAME, load_tokenizer, token_byte_lengths
from samout.training.checkpointing import (
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from samout.training.config import TrainConfig, load_config_file
from samout.training.schedule import build_scheduler

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
TRAIN_CONFIG_NAME = "train_config.json"
DEFAULT_PRESET = "small"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, scalars or embeddings)."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embed]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embed]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) is much faster than the per-parameter loop on CPU.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


class Trainer:
    def __init__(self, model: torch.nn.Module, data: TokenData, cfg: TrainConfig, run_dir: str | Path,
                 *, rank: int = 0, world_size: int = 1, quiet: bool = False) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.quiet = quiet or not self.is_main
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.token_bytes = token_byte_lengths(load_tokenizer(data.tokenizer_path))
        self.step = 0  # optimizer steps done
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.stop_requested = False
        self.last_eval: dict[str, float] | None = None

    # -- state for checkpoints -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "train_config": self.cfg.to_dict(),
            "data_dir": str(self.data.dir.resolve()),
            # Batches are a pure function of these (TokenData.train_batch): the data position.
            "data_position": {"next_step": self.step, "seed": self.cfg.seed, "world_size": self.world_size},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.data.tokenizer_path,
                               self.state_dict(), self.cfg.keep_checkpoints)

    # -- one optimizer step ----------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        self.model.train()
        self.scheduler.set_lr(self.step, self.tokens_seen, self.elapsed)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.data.train_batch(self.step, micro, cfg.batch_size, cfg.seq_len, cfg.seed, self.rank)
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                logits, _ = self.model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / cfg.grad_accum).backward()
            total += loss.item()
        self._apply_update()
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step * self.world_size
        return total / cfg.grad_accum

    def _apply_update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- stopping, evaluation, logging -----------------------------------------
    def stop_reason(self) -> str | None:
        cfg = self.cfg
        if self.stop_requested:
            return "stop requested"
        if self.step >= cfg.max_steps:
            return f"reached max_steps={cfg.max_steps}"
        if cfg.max_tokens is not None and self.tokens_seen >= cfg.max_tokens:
            return f"reached max_tokens={cfg.max_tokens:,}"
        if cfg.max_time is not None and self.elapsed >= cfg.max_time:
            return f"reached max_time={cfg.max_time:g}s"
        return None

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

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.model, self.data, self.token_bytes, self.cfg.seq_len,
                          max_windows=self.cfg.eval_windows, batch_size=self.cfg.batch_size,
                          device=self.device, autocast_dtype=self.autocast_dtype)
        self.last_eval = {"val_loss": result.loss, "val_bpb": result.bits_per_byte,
                          "val_ppl": result.perplexity}
        return self.last_eval

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with (self.run_dir / LOG_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be redone)."""
        path = self.run_dir / LOG_NAME
        if path.is_file():
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
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_log()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=True if self.quiet else None, dynamic_ncols=True)  # None: off if not a TTY
        window_tokens, window_start = 0, time.perf_counter()
        last_saved = self.step if self.step else None
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
                          "tokens_per_s": tok_s, "elapsed": self.elapsed})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", eta=self._eta(tok_s),
                                refresh=False)
            bar.update(1)
            if not math.isfinite(loss) and not self.quiet:
                bar.write(f"warning: non-finite loss at step {self.step}")
            reason = self.stop_reason()
            if self.step % cfg.eval_every == 0 or reason is not None:
                ev = self.evaluate()
                self.log({"type": "eval", "step": self.step, **ev, "tokens": self.tokens_seen})
                if not self.quiet:  # also the progress report when stderr is not a terminal
                    bar.write(f"step {self.step}: train loss {loss:.4f}, val loss {ev['val_loss']:.4f}, "
                              f"val bits/byte {ev['val_bpb']:.4f}, {self.elapsed:.0f}s")
            if self.is_main and (self.step % cfg.save_every == 0 or reason is not None):
                self.save()
                last_saved = self.step
        bar.close()
        if self.is_main:
            if last_saved != self.step:
                self.save()
            plot_losses(self.run_dir / LOG_NAME, self.run_dir / PLOT_NAME)
        return {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed, "stop_reason": reason,
                **(self.last_eval or {})}


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
    if model_type not in MODEL_CLASSES:
        raise SamoutError(f"unknown model_type {model_type!r}: choose one of {', '.join(MODEL_CLASSES)}")
    config_class = MODEL_CLASSES[model_type].config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SamoutError(f"unknown setting(s) {', '.join(unknown)}: not a training setting nor a field "
                          f"of the {model_type} model config")
    fields.update(vocab_size=vocab_size, padding_idx=PAD_ID)
    try:
        if preset is not None:
            return model_type, config_class.from_preset(preset, **fields)
        return model_type, config_class.from_dict(fields)
    except TypeError as err:
        raise SamoutError(f"bad model setting: {err}") from None


def train(data_dir: str | Path, run_dir: str | Path, *, preset: str | None = None,
          config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
          model_overrides: dict[str, Any] | None = None, resume: bool = False,
          quiet: bool = False) -> dict[str, Any]:
    """Train a model on a prepared data directory into `run_dir` (or continue it with `resume`).

    `overrides` are TrainConfig fields (they win over the config file and, on resume,
    over the saved settings); `model_overrides` are model config fields.
    """
    data = TokenData(data_dir)
    run_dir = Path(run_dir)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    checkpoint = latest_checkpoint(run_dir)
    if resume:
        if checkpoint is None:
            raise SamoutError(f"no checkpoint in {run_dir} to resume from: train without --resume first")
        state = load_training_state(checkpoint)
        cfg = TrainConfig.from_dict({**state["train_config"], **overrides})
        data.check_seq_len(cfg.seq_len)
        model = load_pretrained(checkpoint)
        if model.config.vocab_size != data.vocab_size:
            raise SamoutError(f"{data_dir} has vocab {data.vocab_size} but the run's model has "
                              f"{model.config.vocab_size}: resume with the data it was trained on")
        trainer = Trainer(model, data, cfg, run_dir, quiet=quiet)
        trainer.load_state_dict(state)
        if not quiet:
            print(f"resuming {run_dir} from {checkpoint.name} (step {trainer.step})")
    else:
        if checkpoint is not None:
            raise SamoutError(f"{run_dir} already holds a run (up to {checkpoint.name}): "
                              "add --resume to continue it, or choose another --out")
        file_model, file_train = load_config_file(config_file) if config_file else ({}, {})
        cfg = TrainConfig.from_dict({**file_train, **overrides})
        data.check_seq_len(cfg.seq_len)
        fields = {**file_model, **(model_overrides or {})}
        preset = preset or fields.pop("preset", None) or (None if config_file else DEFAULT_PRESET)
        fields.pop("preset", None)
        model_type, model_config = build_model_config(fields, data.vocab_size, preset)
        torch.manual_seed(cfg.seed)
        model = MODEL_CLASSES[model_type](model_config)
        trainer = Trainer(model, data, cfg, run_dir, quiet=quiet)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not quiet:
            n = model.num_parameters()
            print(f"training {model_type} ({n:,} parameters) on {data.dir}: {cfg.tokens_per_step:,} "
                  f"tokens/step, up to {cfg.max_steps} steps, device {trainer.device}")
    atomic_write(run_dir / TRAIN_CONFIG_NAME,
                 json.dumps({**cfg.to_dict(), "data_dir": str(data.dir.resolve())}, indent=2) + "\n")
    if not (run_dir / TOKENIZER_NAME).exists():
        atomic_write(run_dir / TOKENIZER_NAME, data.tokenizer_path.read_bytes())
    return trainer.fit()
