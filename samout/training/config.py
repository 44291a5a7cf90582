"""The settings of a run: `TrainConfig` (every training setting), config files (YAML or
JSON) that may hold model fields and training fields side by side, and how flags, a file
and a preset combine into the model config (`resolve_settings`):

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from samout.device import DEVICE_HELP
from samout.errors import SamoutError
from samout.models import MODEL_CLASSES
from samout.tokenizer import PAD_ID

DEFAULT_PRESET = "small"
OBJECTIVES = ("lm", "sft", "dpo", "grpo")


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A TrainConfig field; `help` is its `samout train --flag` help (flags are generated from
    the fields, see samout/commands/train.py). metadata: `parse` (a function of the flag's
    text), `flag=False` (a setting of config files only)."""
    return field(default=default, metadata={"help": help, **metadata})


# Warmup when --warmup-steps is not given: it ends at the first of WARMUP_MAX_STEPS steps or
# WARMUP_FRACTION of any budget of the run (max_steps, max_tokens, max_time), so that short
# runs reach their peak learning rate (see samout.training.schedule).
WARMUP_MAX_STEPS = 100
WARMUP_FRACTION = 0.05


@dataclass
class TrainConfig:
    # When to stop: the first of steps, tokens or wall time that is reached.
    max_steps: int = setting(2000, "total optimizer steps (a resumed run continues up to this)")
    max_tokens: int | None = setting(None, "stop after this many training tokens")
    max_time: float | None = setting(None, "stop after this much training time, e.g. 240s, 4m, 1h",
                                     parse="duration")  # seconds
    # Batches: tokens per optimizer step = batch_size * grad_accum * seq_len (* world size).
    seq_len: int = setting(256, "tokens per training sequence")
    batch_size: int = setting(16, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    # AdamW, linear warmup then cosine decay to min_lr_ratio * lr.
    lr: float = setting(2e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of --lr", flag=False)
    warmup_steps: int | None = setting(
        None, f"linear warmup steps (default: until the first of {WARMUP_MAX_STEPS} steps or "
              f"{WARMUP_FRACTION:.0%} of --max-steps, --max-tokens or --max-time)")
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only)")
    beta1: float = setting(0.9, "AdamW beta1", flag=False)
    beta2: float = setting(0.95, "AdamW beta2", flag=False)
    grad_clip: float = setting(1.0, "gradient norm clipping")
    dtype: str = setting("float32", "float32 or bfloat16 (autocast)")
    device: str = setting("auto", DEVICE_HELP)
    seed: int = setting(0, "seed of initialisation and data order")
    # Bookkeeping.
    eval_every: int = setting(200, "evaluate every N steps")
    eval_windows: int = setting(32, "validation windows per periodic evaluation")
    save_every: int = setting(500, "checkpoint every N steps")
    keep_checkpoints: int = setting(3, "how many checkpoints to keep")
    log_every: int = setting(10, "log training loss every N steps")
    # Stop with an error after this many consecutive steps with a non-finite loss or
    # gradient (each one is skipped: no weight or optimizer change).
    max_bad_steps: int = setting(5, "stop after this many consecutive non-finite steps (each is skipped)")
    # Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of
    # replicating them (DDP).
    fsdp: bool = setting(False, "under torchrun: shard the model with FSDP2 instead of DDP (see README)")
    # What to minimise (samout/training/objectives.py): lm (pretraining), sft, dpo or grpo.
    objective: str = setting("lm", "lm (next token), sft (assistant tokens of --format chat data), dpo "
                                   "(--format dpo data, needs --init-from) or grpo (--format prompts data, "
                                   "needs --init-from and --reward)")
    dpo_beta: float = setting(0.1, "DPO: strength of the pull towards the reference model")
    # GRPO (samout/training/grpo): --batch-size prompts per micro-batch, each sampled G times.
    num_generations: int = setting(8, "GRPO: completions sampled per prompt (the group)")
    max_completion_length: int = setting(32, "GRPO: most tokens sampled per completion")
    temperature: float = setting(1.0, "GRPO: sampling temperature; the loss's log-probabilities are "
                                      "softmax(logits / temperature) too")
    reward: list[str] | None = setting(None, "GRPO: a reward, built-in (task, answer, format) or "
                                             "module:function; repeat for several", append=True)
    reward_weights: list[float] | None = setting(None, "GRPO: weights of the rewards, e.g. 1,0.5 (default "
                                                       "all 1)", parse="floats")
    epsilon: float = setting(0.2, "GRPO: clipping range of the probability ratio")
    kl_beta: float = setting(0.0, "GRPO: weight of the KL penalty to the --init-from model (k3 estimator)")
    grpo_loss: str = setting("grpo", "GRPO: grpo (mean over each completion's tokens) or dr_grpo (no std "
                                     "scaling, sum over tokens / max length)")
    grpo_iterations: int = setting(1, "GRPO: optimizer steps on each batch of rollouts")
    # Start from this run's model (weights, config, tokenizer); DPO's frozen reference.
    init_from: str | None = setting(None, "start from this run's model, tokenizer and model config (fresh "
                                          "optimizer and schedule); for dpo also the frozen reference")

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
        if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
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
            raise SamoutError(f"unknown device {self.device!r}: use {DEVICE_HELP}") from None
        if not isinstance(self.fsdp, bool):
            raise SamoutError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.objective not in OBJECTIVES:
            raise SamoutError(f"objective must be lm, sft, dpo or grpo, got {self.objective!r}")
        if not (_is_number(self.dpo_beta) and math.isfinite(self.dpo_beta) and self.dpo_beta > 0):
            raise SamoutError(f"dpo_beta must be a positive number, got {self.dpo_beta!r}")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise SamoutError(f"init_from must be a run directory path, got {self.init_from!r}")
        if self.objective == "dpo" and self.init_from is None:
            raise SamoutError("--objective dpo needs --init-from RUN_DIR (the frozen reference model)")
        self._validate_grpo()

    def _validate_grpo(self) -> None:
        if self.objective == "grpo" and self.fsdp:
            # The rollouts call the sharded model outside FSDP2's forward hooks (aten.mm gets
            # mixed Tensor and DTensor); DDP works. Refused rather than failing at step 1.
            raise SamoutError("--objective grpo does not run with --fsdp yet: use DDP (drop --fsdp)")
        for name in ("num_generations", "max_completion_length", "grpo_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SamoutError(f"{name} must be a positive integer, got {value!r}")
        for name, lo, hi in (("temperature", 0, math.inf), ("epsilon", 0, 1), ("kl_beta", 0, math.inf)):
            value = getattr(self, name)
            if not (_is_number(value) and lo <= value <= hi and math.isfinite(value)):
                raise SamoutError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        if self.grpo_loss not in ("grpo", "dr_grpo"):
            raise SamoutError(f"grpo_loss must be grpo or dr_grpo, got {self.grpo_loss!r}")
        reward = self.reward
        if reward is not None and not (isinstance(reward, list) and all(isinstance(r, str) for r in reward)):
            raise SamoutError(f"reward must be a list of names, got {reward!r}")
        weights = self.reward_weights
        if weights is not None:
            if not isinstance(weights, list) or not all(_is_number(w) and math.isfinite(w) for w in weights):
                raise SamoutError(f"reward_weights must be a list of numbers, got {weights!r}")
            if len(weights) != len(reward or []):
                raise SamoutError(f"--reward-weights has {len(weights)} weight(s) for {len(reward or [])} "
                                  "reward(s): give one weight per --reward")
        if self.objective != "grpo":
            return
        if self.init_from is None:
            raise SamoutError("--objective grpo needs --init-from RUN_DIR (the policy to start from, and the "
                              "KL reference)")
        if not reward:
            raise SamoutError("--objective grpo needs --reward NAME (task, answer, format or "
                              "module:function)")
        if self.temperature == 0:
            raise SamoutError("--temperature must be positive for grpo: greedy replies of a prompt are all "
                              "alike, so no reply has an advantage")
        if self.num_generations < 2:
            raise SamoutError("--num-generations must be at least 2: advantages compare the completions "
                              "of a prompt")

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
        if isinstance(data.get("reward_weights"), str):
            data["reward_weights"] = parse_floats(data["reward_weights"])
        if isinstance(data.get("reward"), str):
            data["reward"] = [data["reward"]]
        return cls(**data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_floats(text: str) -> list[float]:
    """[1.0, 0.5] from `1,0.5`."""
    try:
        return [float(part) for part in str(text).split(",")]
    except ValueError:
        raise SamoutError(f"not a comma-separated list of numbers: {text!r} (e.g. 1,0.5)") from None


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


def build_model_config(model_fields: dict[str, Any], vocab_size: int, preset: str | None):
    """The model's config: preset (if any) + fields, with the vocab taken from the tokenizer."""
    fields = dict(model_fields)
    model_type = fields.pop("model_type", "samout")
    if not isinstance(model_type, str) or model_type not in MODEL_CLASSES:
        raise SamoutError(f"unknown model_type {model_type!r}: choose one of {', '.join(MODEL_CLASSES)}")
    config_class = MODEL_CLASSES[model_type].config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    known |= set(getattr(config_class, "preset_options", ()))  # keys besides the fields, e.g. baseline
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


def check_same_model(config, fields: dict[str, Any], preset: str | None) -> None:
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
