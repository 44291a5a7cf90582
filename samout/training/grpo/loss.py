"""The GRPO loss on one group's (or a batch's) per-token log-probabilities.

    advantage   A_i = r_i - mean(r)              over the G completions of one prompt
                      / (std(r) + 1e-4)          grpo only (Dr. GRPO drops the std scaling)
    ratio       rho_t = exp(log pi(t) - log pi_old(t))
    per token   -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta KL_t
    KL          k3 estimator (Schulman), as TRL: exp(ref - pi) - (ref - pi) - 1
    grpo        mean over a completion's tokens, then over completions
    dr_grpo     sum over all tokens / (completions * max_completion_length): no length bias

`std` is torch's (unbiased), as TRL's. A group whose rewards are all equal has advantage 0:
it contributes only its KL term.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo")


def group_advantages(rewards: Tensor, scale: bool = True) -> Tensor:
    """rewards [P, G] (P prompts, G completions each) -> advantages [P, G]."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + 1e-4)


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon: float = 0.2,
              ref_logps: Tensor | None = None, beta: float = 0.0, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, statistics) for per-token log-probabilities [N, L] of N completions with
    advantages [N] and a mask [N, L] (True on completion tokens)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    adv = advantages[:, None].to(logps.dtype)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        width = max_completion_length or logps.shape[-1]
        loss = (per_token * mask).sum() / (logps.shape[0] * width)
    tokens = mask.sum().clamp(min=1)
    clip = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    stats = {"kl": ((kl * mask).sum() / tokens).detach(),
             "clip_fraction": ((clip.to(mask.dtype) * mask).sum() / tokens).detach(),
             "ratio_mean": ((ratio * mask).sum() / tokens).detach()}
    return loss, stats
