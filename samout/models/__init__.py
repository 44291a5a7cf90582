"""Full language models."""

from samout.models.samout import SamOut

__all__ = ["SamOut"]
