"""Learning rate: linear warmup from 0 over `warmup_steps`, then cosine decay to
`min_lr_ratio * lr` at the end of the run.

Without `warmup_steps` the warmup ends at the first of 100 steps or 5% of any budget of
the run: 5% of max_steps, of max_tokens or of max_time (`WARMUP_MAX_STEPS`,
`WARMUP_FRACTION`). A fixed 100 steps would leave a short run (a 3-minute `--max-time` on a
slow machine makes 30 steps) warming up until its end.

"The end" is whichever stopping rule is nearest: max_steps, max_tokens or max_time.
With a time budget the decay follows the clock, so a `--max-time 4m` run ends at the
low learning rate whatever the machine's speed (at the price of a schedule that is no
longer a pure function of the step; runs without max_time stay exactly reproducible).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samout.training.config import WARMUP_FRACTION, WARMUP_MAX_STEPS, TrainConfig


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float,
                  progress: float | None = None) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based). `progress` in [0, 1]
    overrides the step-based position in the decay (used for token and time budgets)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if progress is None:
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """Sets the optimizer's lr before each step; its state is the last multiplier used."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.optimizer, self.cfg = optimizer, cfg
        self.multiplier = 0.0
        self.warmup_steps = warmup_steps(cfg)

    def progress(self, step: int, tokens: int, elapsed: float) -> float:
        cfg = self.cfg
        fractions = [(step - self.warmup_steps) / max(1, cfg.max_steps - self.warmup_steps)]
        if cfg.max_tokens is not None:
            fractions.append(tokens / cfg.max_tokens)
        if cfg.max_time is not None:
            fractions.append(elapsed / cfg.max_time)
        return max(fractions)

    def warmup(self, step: int, tokens: int, elapsed: float) -> float:
        """How far the warmup has gone, in (0, 1]; 1 once it is over."""
        cfg = self.cfg
        fractions = [(step + 1) / (self.warmup_steps + 1) if step < self.warmup_steps else 1.0]
        if cfg.warmup_steps is None:  # the default rule: also a fraction of a token or time budget
            if cfg.max_tokens is not None:
                fractions.append(tokens / (WARMUP_FRACTION * cfg.max_tokens))
            if cfg.max_time is not None:
                fractions.append(elapsed / (WARMUP_FRACTION * cfg.max_time))
        return min(1.0, max(fractions))

    def set_lr(self, step: int, tokens: int = 0, elapsed: float = 0.0) -> float:
        cfg = self.cfg
        warm = self.warmup(step, tokens, elapsed)
        if warm < 1.0:
            self.multiplier = warm
        else:
            self.multiplier = lr_multiplier(step, 0, cfg.max_steps, cfg.min_lr_ratio,
                                            self.progress(step, tokens, elapsed))
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * self.multiplier
        return cfg.lr * self.multiplier

    def get_last_lr(self) -> list[float]:
        return [self.cfg.lr * self.multiplier]

    def state_dict(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiplier = state["multiplier"]


def warmup_steps(cfg: TrainConfig) -> int:
    """The warmup in steps: `cfg.warmup_steps`, or by default the first of WARMUP_MAX_STEPS
    and WARMUP_FRACTION of max_steps (token and time budgets end it earlier, see `Schedule`)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return min(WARMUP_MAX_STEPS, math.ceil(WARMUP_FRACTION * cfg.max_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Schedule:
    return Schedule(optimizer, cfg)
