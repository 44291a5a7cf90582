"""`--objective grpo`: the objective the Trainer runs.

At the first step of every `--grpo-iterations` steps, each micro-batch draws `--batch-size`
prompts (a pure function of seed, step and micro-step), samples `--num-generations`
completions of each (the sampling generator a pure function of seed, step, micro-step and
the prompt's place in the batch), scores them and keeps the batch of rollouts for the
following iterations. A step's loss recomputes the completions' log-probabilities with the
current policy; the "old" log-probabilities are those of the first step on the batch,
detached (TRL's rule): the same function of the same weights, so the ratio is exactly 1
before the first update. The kept rollouts travel in the checkpoint (`state_dict`; the
Trainer gathers every rank's, and each rank reloads its own), so `--resume` in the middle of
the iterations continues exactly, under torchrun too.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samout.data.prompts import PromptData
from samout.errors import SamoutError
from samout.tokenizer import END_OF_TURN_TOKEN, EOT_ID, load_tokenizer
from samout.training.grpo.loss import group_advantages, grpo_loss
from samout.training.grpo.rewards import load_reward, score
from samout.training.grpo.rollout import completion_logps, generator_for, sample_group


class GRPOObjective:
    name = "grpo"

    def __init__(self, data: PromptData, cfg, reference: torch.nn.Module | None = None) -> None:
        self.data, self.cfg = data, cfg
        self.reference = reference
        if reference is not None:
            reference.eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        if cfg.kl_beta > 0 and reference is None:
            raise SamoutError("--kl-beta > 0 needs the --init-from model as the reference")
        self.rewards = [load_reward(spec) for spec in cfg.reward or []]
        if not self.rewards:
            raise SamoutError("--objective grpo needs --reward NAME (task, answer, format or "
                              "module:function)")
        self.weights = list(cfg.reward_weights or [1.0] * len(self.rewards))
        self.tokenizer = load_tokenizer(data.tokenizer_path)
        end = self.tokenizer.token_to_id(END_OF_TURN_TOKEN)
        self.stop_ids = {EOT_ID} | ({end} if end is not None else set())
        # (first step of the iterations, micro-step) -> the rollouts, kept for the iterations.
        self.cache: dict[tuple[int, int], dict[str, Any]] = {}

    # -- rollouts ----------------------------------------------------------------
    def prompts(self, base_step: int, micro: int, rank: int, world_size: int) -> list[tuple[int, int]]:
        """This rank's (place in the global batch, prompt index) pairs."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, base_step, micro, 2])
        picks = rng.integers(0, self.data.num_prompts("train"), size=cfg.batch_size * world_size).tolist()
        lo = rank * cfg.batch_size
        return list(enumerate(picks))[lo:lo + cfg.batch_size]

    def rollout(self, model, split: str, picks: list[tuple[int, int]], seed_parts: tuple[int, ...],
                num: int, temperature: float, autocast_dtype=None) -> dict[str, Any]:
        """Sample `num` completions of every picked prompt and score them. Each prompt runs on
        its own, seeded by (seed_parts, its place): the same tokens whatever shares the batch."""
        cfg = self.cfg
        groups, totals, per_reward = [], [], {name: [] for name, _ in self.rewards}
        generated, t0 = 0, time.perf_counter()
        for place, index in picks:
            prompt = self.data.prompt_ids(split, index)
            completions = sample_group(model, prompt, num, cfg.max_completion_length, temperature,
                                       generator_for(*seed_parts, place), self.stop_ids, autocast_dtype)
            generated += sum(len(c) for c in completions)
            groups.append({"prompt": prompt, "completions": completions, "index": index})
        seconds = time.perf_counter() - t0
        for group in groups:
            row = self.data.columns(split, group["index"])
            columns = {k: [v] * num for k, v in row.items() if k != "messages"}
            texts = [self.tokenizer.decode([t for t in c if t not in self.stop_ids], skip_special_tokens=True)
                     for c in group["completions"]]
            completions = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational form
            total, per = score(self.rewards, self.weights, completions, prompts=[row["messages"]] * num,
                               completion_ids=group["completions"], **columns)
            totals.append(total)
            for name, values in per.items():
                per_reward[name].append(values)
        rewards = torch.tensor(totals, dtype=torch.float32)  # [P, G]
        advantages = (group_advantages(rewards, scale=cfg.grpo_loss == "grpo") if num > 1
                      else torch.zeros_like(rewards))
        return {"groups": groups, "rewards": rewards, "advantages": advantages,
                "per_reward": {k: torch.tensor(v, dtype=torch.float32) for k, v in per_reward.items()},
                "tokens_per_s": generated / max(seconds, 1e-9), "old": [None] * len(groups)}

    # -- the step ------------------------------------------------------------------
    def micro_loss(self, model, step_index: int, micro: int, rank: int, world_size: int, device,
                   autocast_dtype) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        base = step_index - step_index % cfg.grpo_iterations
        key = (base, micro)
        fresh = key not in self.cache
        if fresh:
            self.cache = {k: v for k, v in self.cache.items() if k[0] == base}
            picks = self.prompts(base, micro, rank, world_size)
            self.cache[key] = self.rollout(model, "train", picks, (cfg.seed, base, micro),
                                           cfg.num_generations, cfg.temperature, autocast_dtype)
        batch = self.cache[key]
        losses, stats_sum = [], {"kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0}
        lengths = []
        for g, group in enumerate(batch["groups"]):
            logps, mask = completion_logps(model, group["prompt"], group["completions"], cfg.temperature,
                                           autocast_dtype)
            if batch["old"][g] is None:  # the first step on these rollouts: the policy that sampled them
                batch["old"][g] = logps.detach().cpu()
            old = batch["old"][g].to(logps.device)
            ref = None
            if cfg.kl_beta > 0:
                with torch.enable_grad():  # the kernels of the policy's pass (no graph: frozen weights)
                    ref, _ = completion_logps(self.reference, group["prompt"], group["completions"],
                                              cfg.temperature, autocast_dtype)
                ref = ref.detach()
            advantages = batch["advantages"][g].to(logps.device)
            loss, stats = grpo_loss(logps, old, advantages, mask, cfg.epsilon, ref, cfg.kl_beta,
                                    cfg.grpo_loss, cfg.max_completion_length)
            losses.append(loss)
            for k in stats_sum:
                stats_sum[k] += float(stats[k]) / len(batch["groups"])
            lengths += [len(c) for c in group["completions"]]
        rewards = batch["rewards"]
        metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(-1).mean()),
                   "frac_zero_std": float((rewards.std(-1) == 0).float().mean()),
                   "completion_length": float(np.mean(lengths)), **stats_sum}
        for name, values in batch["per_reward"].items():
            metrics[f"reward_{name}_mean"] = float(np.nanmean(values.numpy())) if values.numel() else math.nan
            metrics[f"reward_{name}_std"] = float(np.nanstd(values.numpy())) if values.numel() else math.nan
        if fresh:
            metrics["rollout_tokens_per_s"] = batch["tokens_per_s"]
        return torch.stack(losses).mean(), metrics

    # -- checkpointed state ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The kept rollouts (only while iterations on them remain)."""
        if self.cfg.grpo_iterations == 1:
            return {}
        return {"cache": [{"base": k[0], "micro": k[1], **v} for k, v in self.cache.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = {}
        for entry in state.get("cache", []):
            entry = dict(entry)
            self.cache[(entry.pop("base"), entry.pop("micro"))] = entry

    # -- validation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, device, autocast_dtype) -> dict[str, float]:
        """Rewards of greedy replies to validation prompts (eval_windows x batch_size of them,
        spread evenly; all when there are fewer)."""
        cfg = self.cfg
        model.eval()
        n = self.data.num_prompts("val")
        k = cfg.eval_windows * cfg.batch_size
        picks = (list(range(n)) if k >= n
                 else sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())))
        batch = self.rollout(model, "val", list(enumerate(picks)), (cfg.seed,), 1, 0.0, autocast_dtype)
        model.train()
        out = {"val_reward": float(batch["rewards"].mean())}
        for name, values in batch["per_reward"].items():
            out[f"val_reward_{name}"] = float(np.nanmean(values.numpy()))
        return out
