"""Data-parallel training under `torchrun`: process group setup and the few collectives
the trainer needs.

`torchrun --nproc_per_node=N -m samout train ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; `init_distributed()` joins them (gloo on CPU, NCCL on
CUDA). Without those variables everything here is a no-op on a single process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from samout.errors import SamoutError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environment() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (a single process otherwise)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SamoutError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (start with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise SamoutError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank, world, local)


def init_distributed(device: str) -> tuple[DistEnv, str]:
    """Join the process group if started by torchrun. Returns (env, device to train on):
    under DDP on CUDA each process takes cuda:LOCAL_RANK."""
    env = env_from_environment()
    if not env.enabled:
        return env, device
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        device = f"cuda:{env.local_rank}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return env, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(values: list[float], op: str = "sum", device: torch.device | str = "cpu") -> list[float]:
    """Reduce a few floats over the ranks (float64; identity on one process)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the model's state dict (names and bytes, in order): equal on
    every rank while the replicas are identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
