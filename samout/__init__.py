"""samout: softmax-free, linear-time SamOut language models with a fixed-size state."""

from samout import _hf_hook  # noqa: F401  (transformers' Auto classes learn "samout", see there)
from samout.config import PRESETS, SamOutConfig
from samout.models import load_pretrained
from samout.models.samout import SamOut
from samout.models.transformer import Transformer, TransformerConfig, match_transformer_to
from samout.run_dir import load, load_model
from samout.state import State

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "SamOut", "SamOutConfig", "State", "Transformer", "TransformerConfig", "__version__",
    "load", "load_model", "load_pretrained", "match_transformer_to",
]
