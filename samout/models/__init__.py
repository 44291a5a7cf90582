"""Full language models, and loading any of them from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from samout.models.samout import SamOut
from samout.models.transformer import Transformer, TransformerConfig, match_transformer_to

# config.json's "model_type" -> model class. Every architecture registers here.
MODEL_CLASSES: dict[str, type] = {"samout": SamOut, "transformer": Transformer}


def load_pretrained(directory: str | Path, map_location: str = "cpu", verify: bool = True,
                    dtype: str = "float32"):
    """Load whichever model `directory/config.json` describes (checking `checksums.json`, if
    the directory has one, unless `verify=False`); exactly that directory, no fallback
    (`samout.run_dir.load_model` falls back to the newest intact checkpoint). `dtype`
    "bfloat16" or "int8" converts it for inference (samout.quant.convert_for_inference)."""
    from samout.run_dir import load_model

    return load_model(directory, device=map_location, verify=verify, fallback=False, dtype=dtype)


__all__ = [
    "MODEL_CLASSES", "SamOut", "Transformer", "TransformerConfig", "load_pretrained", "match_transformer_to",
]
