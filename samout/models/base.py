"""What every samout language model shares: its size and its checkpoint format.
A model class sets `config_class` and has `config`, `embed` and `head` attributes."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

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

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` (with the model_type) and `model.safetensors` into `directory`,
        and the Hugging Face files that make it loadable by path (samout.remote_code)."""
        save_model_weights(self, self.config, directory)
        write_hf_files(directory)

    @classmethod
    def from_pretrained(cls: type[ModelT], directory: str | Path, map_location: str = "cpu") -> ModelT:
        return load_model_weights(cls, directory, map_location)
