"""What a training step minimises: `--objective lm|sft|dpo`.

Each objective gives the loss of one micro-batch (drawn as a pure function of seed, step and
micro-step, so `--resume` stays exact) and, for sft/dpo, its own validation:

    lm    next-token cross-entropy on random windows of the token stream (pretraining)
    sft   cross-entropy on assistant tokens only (the mask of `prepare --format chat`), over
          packed conversations, each run with a fresh state (samout.data.chat)
    dpo   Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference
          model, the `--init-from` model:
              loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
          where log p(.) sums the completion's token log-probabilities given the prompt.
    grpo  Group Relative Policy Optimization on sampled completions of `--format prompts`
          data, scored by verifiable rewards (samout/training/grpo)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samout.data.chat import IGNORE, ChatData
from samout.data.dataset import TokenData
from samout.data.prompts import PromptData
from samout.errors import SamoutError
from samout.training import step
from samout.training.grpo.objective import GRPOObjective

DATA_KIND = {"sft": "chat", "dpo": "dpo"}


def masked_lm_loss(model: torch.nn.Module, x: Tensor, y: Tensor,
                   autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, int]:
    """(mean cross-entropy over targets that are not -100, their number); 0 (with a graph)
    when there is none, so a batch without assistant tokens is a no-op, not a NaN."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, _ = model(x)
    count = int((y != IGNORE).sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE), count


def sequence_logps(model: torch.nn.Module, x: Tensor, y: Tensor,
                   autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Per row, the summed log-probability of its targets that are not -100 ([rows])."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, _ = model(x)
    logp = torch.log_softmax(logits.float(), -1)
    valid = y != IGNORE
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, dict[str, float]]:
    """Mean DPO loss over pairs, and the implicit rewards' statistics."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    margin, chosen_reward, rejected_reward = margin.detach(), chosen_reward.detach(), rejected_reward.detach()
    return loss, {"reward_margin": float(margin.mean()),
                  "reward_accuracy": float((margin > 0).float().mean()),
                  "chosen_reward": float(chosen_reward.mean()),
                  "rejected_reward": float(rejected_reward.mean())}


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


class LMObjective:
    name = "lm"

    def __init__(self, data: TokenData, cfg) -> None:
        self.data, self.cfg = data, cfg

    def micro_loss(self, model, step_index: int, micro: int, rank: int, world_size: int, device,
                   autocast_dtype) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x, y = self.data.train_batch(step_index, micro, cfg.batch_size, cfg.seq_len, cfg.seed, rank,
                                     world_size)
        return step.lm_loss(model, x.to(device), y.to(device), autocast_dtype), {}

    evaluate = None  # the Trainer's own: loss and bits per byte over the validation stream


class SFTObjective:
    name = "sft"

    def __init__(self, data: ChatData, cfg) -> None:
        self.data, self.cfg = data, cfg

    def micro_loss(self, model, step_index: int, micro: int, rank: int, world_size: int, device,
                   autocast_dtype) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        rows = self.data.packed_rows(step_index, micro, cfg.batch_size, cfg.seq_len, cfg.seed, rank,
                                     world_size)
        x, y = self.data.segments("train", [i for row in rows for i in row], cfg.seq_len)
        loss, count = masked_lm_loss(model, x.to(device), y.to(device), autocast_dtype)
        return loss, {"assistant_tokens": float(count)}

    @torch.no_grad()
    def evaluate(self, model, device, autocast_dtype) -> dict[str, float]:
        """Mean loss on the assistant tokens of validation conversations (eval_windows x
        batch_size of them, spread evenly; all when there are fewer)."""
        cfg = self.cfg
        model.eval()
        picks = _spread(self.data.num_sequences("val"), cfg.eval_windows * cfg.batch_size)
        total, count = 0.0, 0
        for i in range(0, len(picks), cfg.batch_size):
            x, y = self.data.segments("val", picks[i:i + cfg.batch_size], cfg.seq_len)
            loss, n = masked_lm_loss(model, x.to(device), y.to(device), autocast_dtype)
            total += float(loss) * n
            count += n
        model.train()
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_assistant_tokens": count}


class DPOObjective:
    name = "dpo"

    def __init__(self, data: ChatData, cfg, reference: torch.nn.Module) -> None:
        self.data, self.cfg = data, cfg
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def pairs(self, step_index: int, micro: int, rank: int, world_size: int) -> list[int]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step_index, micro, 0])
        n = self.data.num_sequences("train") // 2
        picks = rng.integers(0, n, size=cfg.batch_size * world_size)
        return picks[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].tolist()

    def pair_loss(self, model, split: str, pairs: list[int], device, autocast_dtype):
        seqs = [j for i in pairs for j in (2 * i, 2 * i + 1)]
        x, y = self.data.segments(split, seqs, self.cfg.seq_len)
        x, y = x.to(device), y.to(device)
        policy = sequence_logps(model, x, y, autocast_dtype)
        with torch.no_grad():
            ref = sequence_logps(self.reference, x, y, autocast_dtype)
        loss, stats = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.cfg.dpo_beta)
        stats["preference_accuracy"] = float((policy[0::2] > policy[1::2]).float().mean())
        return loss, stats

    def micro_loss(self, model, step_index: int, micro: int, rank: int, world_size: int, device,
                   autocast_dtype) -> tuple[Tensor, dict[str, float]]:
        return self.pair_loss(model, "train", self.pairs(step_index, micro, rank, world_size), device,
                              autocast_dtype)

    @torch.no_grad()
    def evaluate(self, model, device, autocast_dtype) -> dict[str, float]:
        cfg = self.cfg
        model.eval()
        picks = _spread(self.data.num_sequences("val") // 2, cfg.eval_windows * cfg.batch_size)
        sums: dict[str, float] = {}
        for i in range(0, len(picks), cfg.batch_size):
            chunk = picks[i:i + cfg.batch_size]
            loss, stats = self.pair_loss(model, "val", chunk, device, autocast_dtype)
            for key, value in {"loss": float(loss), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value * len(chunk)
        model.train()
        return {f"val_{k}": v / max(len(picks), 1) for k, v in sums.items()}


def build_objective(cfg, data: TokenData, reference: torch.nn.Module | None = None) -> Any:
    if cfg.objective == "lm":
        return LMObjective(data, cfg)
    if cfg.objective == "sft":
        return SFTObjective(data, cfg)
    if cfg.objective == "grpo":
        return GRPOObjective(data, cfg, reference)  # type: ignore[arg-type]
    if reference is None:
        raise SamoutError("--objective dpo needs --init-from RUN_DIR: its model is the frozen reference")
    return DPOObjective(data, cfg, reference)


def load_data(data_dir, objective: str) -> TokenData:
    """The data directory, checked to hold what the objective trains on."""
    if objective == "lm":
        return TokenData(data_dir)
    if objective == "grpo":
        return PromptData(data_dir)
    return ChatData(data_dir, DATA_KIND[objective])
