"""Token mixers (MaxStateSuper variants)."""

from samout.layers.mixers import MIXER_CLASSES, MaxStateSuper, build_mixer

__all__ = ["MIXER_CLASSES", "MaxStateSuper", "build_mixer"]
