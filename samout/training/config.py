"""`TrainConfig`: every training setting, and config files (YAML or JSON) that may hold
model fields and training fields side by side:

    preset: small          # optional: start from a preset
    model_type: samout     # which architecture (samout.models.MODEL_CLASSES)
    hidden_size: 256       # any field of the model's config class
    lr: 2.0e-3             # any field of TrainConfig
    max_steps: 2000
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from samout.errors import SamoutError


@dataclass
class TrainConfig:
    # When to stop: the first of steps, tokens or wall time that is reached.
    max_steps: int = 2000
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    # Batches: tokens per optimizer step = batch_size * grad_accum * seq_len (* world size).
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    # AdamW, linear warmup then cosine decay to min_lr_ratio * lr.
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"  # or "bfloat16" (autocast)
    device: str = "auto"
    seed: int = 0
    # Bookkeeping.
    eval_every: int = 200
    eval_windows: int = 32
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    # Stop with an error after this many consecutive steps with a non-finite loss or
    # gradient (each one is skipped: no weight or optimizer change).
    max_bad_steps: int = 5
    # Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of
    # replicating them (DDP).
    fsdp: bool = False
    # What to minimise (samout/training/objectives.py): lm (pretraining), sft or dpo.
    objective: str = "lm"
    dpo_beta: float = 0.1
    # Start from this run's model (weights, config, tokenizer); DPO's frozen reference.
    init_from: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("max_steps", "seq_len", "batch_size", "grad_accum", "eval_every", "eval_windows",
                    "save_every", "keep_checkpoints", "log_every", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SamoutError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_tokens", "max_time"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise SamoutError(f"{name} must be positive, got {value!r}")
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise SamoutError(f"lr must be positive, got {self.lr!r}")
        warmup = self.warmup_steps
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise SamoutError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise SamoutError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise SamoutError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        ranges = {"min_lr_ratio": (0, 1), "beta1": (0, 1), "beta2": (0, 1),
                  "weight_decay": (0, math.inf), "grad_clip": (0, math.inf)}
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if not (_is_number(value) and lo <= value <= hi and math.isfinite(value)):
                raise SamoutError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.device, str):
            raise SamoutError(f"device must be a string such as auto, cpu or cuda, got {self.device!r}")
        try:
            if self.device != "auto":
                torch.device(self.device)
        except (RuntimeError, ValueError):
            raise SamoutError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N") from None
        if not isinstance(self.fsdp, bool):
            raise SamoutError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.objective not in ("lm", "sft", "dpo"):
            raise SamoutError(f"objective must be lm, sft or dpo, got {self.objective!r}")
        if not (_is_number(self.dpo_beta) and math.isfinite(self.dpo_beta) and self.dpo_beta > 0):
            raise SamoutError(f"dpo_beta must be a positive number, got {self.dpo_beta!r}")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise SamoutError(f"init_from must be a run directory path, got {self.init_from!r}")
        if self.objective == "dpo" and self.init_from is None:
            raise SamoutError("--objective dpo needs --init-from RUN_DIR (the frozen reference model)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise SamoutError(f"training settings must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise SamoutError(f"unknown training setting(s): {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("max_time"), str):
            data["max_time"] = parse_duration(data["max_time"])
        return cls(**data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_duration(text: str | float) -> float:
    """Seconds from `240`, `240s`, `4m`, `1.5h`."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not match:
        raise SamoutError(f"not a duration: {text!r} (use e.g. 240s, 4m or 1.5h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model fields incl. `preset`/`model_type`, training fields) from a YAML or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SamoutError(f"{path} is not valid {kind}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SamoutError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise SamoutError(f"{path}: setting names must be text, got {bad_keys[0]!r}")
    train = {k: v for k, v in data.items() if k in TRAIN_FIELDS}
    model = {k: v for k, v in data.items() if k not in TRAIN_FIELDS}
    return model, train
