"""One training step's pieces, shared by `Trainer` and the benchmarks, so that a
benchmark measures exactly the work a user's training run does.

    loss = lm_loss(model, inputs, targets)      # forward + next-token cross-entropy
    loss.backward()
    grad_norm, stepped = clip_and_step(model.parameters(), optimizer, grad_clip, loss.item())
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), fused: bool = True) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, scalars or embeddings)."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embed]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embed]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) is much faster than the per-parameter loop on CPU.
    fused = fused and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lm_loss(model: torch.nn.Module, inputs: Tensor, targets: Tensor,
            autocast_dtype: torch.dtype | None = None, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy of `model(inputs)` against `targets` ([B, T] each),
    computed by the model without the full logits (SamOut.forward's `targets`)."""
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, _ = model(inputs, targets=targets, ignore_index=ignore_index)
    return loss


def clip_and_step(parameters: Iterable[Tensor], optimizer: torch.optim.Optimizer, grad_clip: float,
                  loss: float | None = None) -> tuple[float, bool]:
    """Clip the gradient norm, take the optimizer step unless the loss or the norm is not
    finite (then weights and optimizer state stay untouched), clear the gradients.
    Returns (gradient norm before clipping, whether the step was taken)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    finite = math.isfinite(grad_norm) and (loss is None or math.isfinite(loss))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite
