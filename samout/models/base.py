"""What every samout language model shares: its size and its checkpoint format (config.json
and model.safetensors; the file names and atomic writes come from `samout.files`).
A model class sets `config_class` and has `config`, `embed` and `head` attributes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from samout.device import resolve_device
from samout.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    atomic_write_with,
    read_config_dict,
)
from samout.ops.linear_cross_entropy import linear_cross_entropy
from samout.remote_code import write_hf_files

ModelT = TypeVar("ModelT", bound="PretrainedModelMixin")


class PretrainedModelMixin:
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without the
        embedding and output head, the figure compared across architectures."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed.weight), None)
            params.pop(id(self.head.weight), None)
        return sum(p.numel() for p in params.values())

    def head_output(self, x: Tensor, targets: Tensor | None, ignore_index: int = -100) -> Tensor:
        """The head's logits of the final hidden states x [B, T, D]; with `targets` [B, T]
        (the token each position must predict) the mean cross-entropy instead, computed
        without the [B, T, V] logits while training (samout/ops/linear_cross_entropy.py)."""
        if targets is None:
            return self.head(x)
        if not isinstance(targets, Tensor) or targets.shape != x.shape[:-1]:
            got = type(targets).__name__ if not isinstance(targets, Tensor) else tuple(targets.shape)
            raise ValueError(f"targets must be a tensor of shape {tuple(x.shape[:-1])} (one per input "
                             f"token), got {got}")
        targets = targets.to(x.device).reshape(-1)
        if type(self.head) is nn.Linear and self.head.bias is None:
            return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.head.weight, targets, ignore_index)
        logits = self.head(x).float()  # a low-precision head (samout.quant): the plain form
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=ignore_index)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` (with the model_type) and `model.safetensors` into `directory`,
        and the Hugging Face files that make it loadable by path (samout.remote_code)."""
        save_model_weights(self, self.config, directory)
        write_hf_files(directory)

    @classmethod
    def from_pretrained(cls: type[ModelT], directory: str | Path, map_location: str = "cpu") -> ModelT:
        """The model `directory` holds (no checksum check: `samout.load_model` does that)."""
        return load_model_weights(cls, directory, map_location)


def state_dict_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors with tied duplicates dropped (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)
        if hash(key) in seen:
            continue
        seen.add(hash(key))
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_model_weights(model: nn.Module, config: Any, directory: str | Path) -> None:
    """`config.json` and `model.safetensors` of `model` into `directory`."""
    directory = Path(directory)
    tensors = state_dict_for_saving(model)
    metadata = {"format": "pt", "model_type": config.model_type}
    atomic_write_with(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, config.to_json())


def load_model_weights(cls: type[ModelT], directory: str | Path,
                       map_location: str | torch.device = "cpu") -> ModelT:
    """Build `cls(config)` from `directory/config.json` and load its safetensors weights.

    The file is parsed on the CPU, so a failure there is the file's fault (corruption), and
    only then moved to `map_location`: a device that cannot be used is reported as such,
    never as a corrupted checkpoint."""
    directory = Path(directory)
    device = resolve_device(str(map_location))
    data = read_config_dict(directory)
    try:
        config = cls.config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint in {directory}: {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is corrupted or truncated: {err}") from None
    model = cls(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied head is saved once; everything else must be present.
    missing = [k for k in missing if not (config.__dict__.get("tie_word_embeddings") and k == "head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}):"
            " it was written by another version of samout"
        )
    return model.to(device)
