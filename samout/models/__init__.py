"""Full language models, and loading any of them from exactly one model directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from samout.files import MODEL_FILES, CheckpointError, read_config_dict, verify_checksums
from samout.models.samout import SamOut
from samout.models.transformer import Transformer, TransformerConfig, match_transformer_to
from samout.quant import convert_for_inference

# config.json's "model_type" -> model class. Every architecture registers here.
MODEL_CLASSES: dict[str, type] = {"samout": SamOut, "transformer": Transformer}


def load_pretrained(directory: str | Path, map_location: str = "cpu", verify: bool = True,
                    dtype: str = "float32") -> nn.Module:
    """Load whichever model `directory/config.json` describes (checking `checksums.json`, if
    the directory has one, unless `verify=False`); exactly that directory, no fallback: the
    same as `samout.load_model(directory, fallback=False)`, which also falls back to a run's
    newest intact checkpoint by default. `dtype` "bfloat16" or "int8" converts it for
    inference (samout.quant.convert_for_inference)."""
    directory = Path(directory)
    if verify and directory.is_dir():
        verify_checksums(directory, names=MODEL_FILES)
    model_type = read_config_dict(directory).get("model_type", "samout")
    if model_type not in MODEL_CLASSES:
        raise CheckpointError(
            f"{directory}: unknown model_type {model_type!r} (known: {', '.join(MODEL_CLASSES)})"
        )
    model = MODEL_CLASSES[model_type].from_pretrained(directory, map_location=map_location)
    if dtype != "float32":
        model = convert_for_inference(model, dtype)
    return model


__all__ = [
    "MODEL_CLASSES", "SamOut", "Transformer", "TransformerConfig", "load_pretrained", "match_transformer_to",
]
