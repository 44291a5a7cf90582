"""Full language models, and loading any of them from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from samout.checkpoint import CheckpointError, read_config_dict, verify_checksums
from samout.models.samout import SamOut
from samout.models.transformer import Transformer, TransformerConfig, match_transformer_to

# config.json's "model_type" -> model class. Every architecture registers here.
MODEL_CLASSES: dict[str, type] = {"samout": SamOut, "transformer": Transformer}


def load_pretrained(directory: str | Path, map_location: str = "cpu", verify: bool = True,
                    dtype: str = "float32"):
    """Load whichever model `directory/config.json` describes (checking `checksums.json`, if
    the directory has one, unless `verify=False`). `dtype` "bfloat16" or "int8" converts
    it for inference (samout.quant.convert_for_inference)."""
    if verify and Path(directory).is_dir():
        verify_checksums(directory)
    model_type = read_config_dict(directory).get("model_type", "samout")
    if model_type not in MODEL_CLASSES:
        raise CheckpointError(
            f"{directory}: unknown model_type {model_type!r} (known: {', '.join(MODEL_CLASSES)})"
        )
    model = MODEL_CLASSES[model_type].from_pretrained(directory, map_location=map_location)
    if dtype != "float32":
        from samout.quant import convert_for_inference

        model = convert_for_inference(model, dtype)
    return model


__all__ = [
    "MODEL_CLASSES", "SamOut", "Transformer", "TransformerConfig", "load_pretrained", "match_transformer_to",
]
