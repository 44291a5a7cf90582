"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models too large to replicate per device.

Each decoder layer and then the whole model are sharded: every rank holds 1/N of the
parameters, gradients and optimizer state, and the full parameters of one layer are
gathered just for its forward and backward. FSDP2 cannot shard 0-dimensional
parameters (SamOut's per-layer `alpha`), so those stay replicated and their gradients
are averaged by hand. Checkpoints hold full (unsharded) tensors, written by rank 0, in
the same format as a single-process run's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def shard_model(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Shard `model` in place; returns the parameters left replicated (0-dimensional ones)."""
    from torch.distributed.fsdp import fully_shard

    replicated = [p for p in model.parameters() if p.dim() == 0]
    ignored = set(replicated)
    for layer in getattr(model, "layers", []):
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return replicated


def average_replicated_grads(params: list[torch.nn.Parameter]) -> None:
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_copy(model: torch.nn.Module, cls: type) -> torch.nn.Module | None:
    """An ordinary (unsharded, CPU) copy of the model on rank 0, None elsewhere. Collective:
    rank 0 holds the full weights in CPU memory while saving or evaluating."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    if dist.get_rank() != 0:
        return None
    full = cls(model.config)  # `cls`: the class before fully_shard replaced it with a subclass
    full.load_state_dict(state)
    return full


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state (keyed by parameter name) on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Every rank passes the full state read from the checkpoint and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
