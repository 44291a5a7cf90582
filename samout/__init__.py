"""samout: softmax-free, linear-time SamOut language models with a fixed-size state."""

from samout.config import PRESETS, SamOutConfig
from samout.models import load_pretrained
from samout.models.samout import SamOut
from samout.models.transformer import Transformer, TransformerConfig, match_transformer_to
from samout.state import State

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "SamOut", "SamOutConfig", "State", "Transformer", "TransformerConfig", "__version__",
    "load_pretrained", "match_transformer_to",
]
