"""samout: softmax-free, linear-time SamOut language models with a fixed-size state."""

from samout import _hf_hook
from samout.config import PRESETS, SamOutConfig
from samout.models import load_pretrained
from samout.models.samout import SamOut
from samout.state import State

__version__ = "0.1.0"

# Hugging Face Auto classes learn "samout" when transformers is imported (optional extra).
_hf_hook.install()

__all__ = ["PRESETS", "SamOut", "SamOutConfig", "State", "__version__", "load_pretrained"]
