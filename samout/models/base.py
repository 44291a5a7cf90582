"""What every samout language model shares: its size and its checkpoint format.
A model class sets `config_class` and has `config`, `embed` and `head` attributes."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from samout.ops.linear_cross_entropy import linear_cross_entropy
from samout.remote_code import write_hf_files
from samout.run_dir import load_model_weights, save_model_weights

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
        return load_model_weights(cls, directory, map_location)
