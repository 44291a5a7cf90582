"""SamOutConfig: every size and option of a SamOut model, with named presets.

The presets reproduce the seed articles (docs/architecture.md, "Presets"); `tiny` is for tests and demos.
A config round-trips through JSON (`to_json` / `from_json`), which is also the
`config.json` of a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

# The token mixers a config may name: data here, so that a config is checked without
# importing the layers; samout.layers.mixers.MIXER_CLASSES implements each of them (checked
# when it is imported).
MixerName = Literal["gen3", "dual", "gen4", "openash", "conv"]
MIXERS: tuple[str, ...] = get_args(MixerName)
DEFAULT_MIXER: MixerName = "openash"
# What a decoder layer mixes tokens with: a MaxStateSuper mixer (`mixer`) or causal
# softmax attention (samout/layers/attention.py), named per layer in `layer_types`.
LAYER_TYPES = ("maxstate", "attention")
# Hugging Face transformers renames a config's "attention" layers to "full_attention" when
# it loads one; both spellings mean the same layer here.
LAYER_TYPE_ALIASES = {"full_attention": "attention"}
# softplus(θ0) for a forgetting running max (`max_decay`): see SamOutConfig.
DEFAULT_MAX_DECAY_INIT = 1e-3
# How the mixers compute (same results; samout/ops/kernels.py): "auto" picks "triton" on
# CUDA tensors when triton imports, else the "fused" autograd kernels; "reference" is the
# plain eager code they are all tested against.
KERNELS = ("auto", "fused", "reference", "triton")

# Bumped when the meaning of saved weights changes; loading another version fails clearly.
FORMAT_VERSION = 1

PRESETS: dict[str, dict[str, Any]] = {
    # The seeds all build the model through the same `SamOut` class, whose embedding
    # hard-codes padding_idx=259; the published openash model pads with index 0.
    "seed-000": dict(mixer="conv", vocab_size=10000, hidden_size=512, num_layers=6,
                     num_heads=8, padding_idx=259),
    "seed-001": dict(mixer="gen3", vocab_size=8460, hidden_size=512, num_layers=8,
                     num_heads=8, padding_idx=259),
    "seed-002": dict(mixer="dual", vocab_size=10000, hidden_size=512, num_layers=6,
                     num_heads=8, padding_idx=259),
    "seed-003": dict(mixer="gen4", vocab_size=8460, hidden_size=512, num_layers=8,
                     num_heads=8, padding_idx=259),
    "openash-85m": dict(mixer="openash", vocab_size=23005, hidden_size=768, num_layers=12,
                        num_heads=8, padding_idx=0),
    # Small enough to train in seconds on a laptop CPU.
    "tiny": dict(mixer=DEFAULT_MIXER, vocab_size=512, hidden_size=64, num_layers=2,
                 num_heads=4, padding_idx=0),
    # The demo's model: a few minutes on 2 CPU cores gets readable text.
    "small": dict(mixer=DEFAULT_MIXER, vocab_size=8192, hidden_size=256, num_layers=4,
                  num_heads=8, padding_idx=0),
    # Hybrids (issue 14): `small` with its second layer made causal softmax attention, over
    # the whole context or a sliding window of 256 tokens (a bounded state), and the
    # forgetting running max in the maxstate layers, started fast (δ = 0.5): the layer
    # below attention then carries the previous token, which recall needs (the design
    # samout.bench.common's `hybrid` variants measure; docs/benchmarks.md, "Hybrid layers").
    # And `small` with a forgetting running max, started slow.
    "hybrid-small": dict(mixer=DEFAULT_MIXER, vocab_size=8192, hidden_size=256, num_layers=4,
                         num_heads=8, padding_idx=0,
                         layer_types=["maxstate", "attention", "maxstate", "maxstate"],
                         max_decay=True, max_decay_init=0.5),
    "hybrid-small-swa": dict(mixer=DEFAULT_MIXER, vocab_size=8192, hidden_size=256, num_layers=4,
                             num_heads=8, padding_idx=0,
                             layer_types=["maxstate", "attention", "maxstate", "maxstate"],
                             max_decay=True, max_decay_init=0.5, attention_window=256),
    "small-decay": dict(mixer=DEFAULT_MIXER, vocab_size=8192, hidden_size=256, num_layers=4,
                        num_heads=8, padding_idx=0, max_decay=True),
}


ConfigT = TypeVar("ConfigT", bound="JsonConfig")


class JsonConfig:
    """JSON round trip for the model config dataclasses (`config.json` of a checkpoint).
    The file carries `format_version`; another version is refused with a clear error."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"config has format_version {version!r} but this samout reads version "
                f"{FORMAT_VERSION}: use the samout release that wrote it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys written by other tools (e.g. Hugging Face's `architectures`) are ignored.
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls: type[ConfigT], path_or_text: str | Path) -> ConfigT:
        """From a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise ValueError(f"config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)


@dataclass
class SamOutConfig(JsonConfig):
    """Sizes and options of a SamOut model.

    The defaults of the options reproduce the seeds: untied output head, no final
    norm, post-norm decoder layers and an FFN as wide as the model.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    mixer: MixerName = DEFAULT_MIXER
    padding_idx: int | None = 0
    # Options (not in the seeds; measured, never silently on for a seed preset).
    ffn_mult: int = 1
    tie_word_embeddings: bool = False
    final_norm: bool = False
    kernel: str = "auto"
    # Training memory: recompute the mixer's projected streams in backward instead of
    # keeping them (samout/ops/recompute.py). Same results; no effect on inference.
    recompute: bool = False
    # Hybrid layers: `layer_types` names each layer's kind (LAYER_TYPES); the short form
    # `attention_every: N` makes layers N-1, 2N-1, ... attention. None: all maxstate.
    layer_types: list[str] | None = None
    attention_every: int | None = None
    # Sliding window of the attention layers (each token sees itself and the W-1 before
    # it; the decode state keeps W-1 keys and values), or None for the whole context.
    attention_window: int | None = None
    # A forgetting running max in every maxstate mixer: m_t = max(x_t, m_{t-1} - δ),
    # δ = softplus(θ) per head-channel, θ initialised so δ = max_decay_init. Small, so a
    # new model starts as the non-forgetting max the seeds train well (a channel forgets
    # a gap of 1 in about 1000 tokens). δ is learnable but in the runs measured it stayed
    # near its start (docs/benchmarks.md, "Hybrid layers"): the start is the real choice.
    max_decay: bool = False
    max_decay_init: float = DEFAULT_MAX_DECAY_INIT
    model_type: str = field(default="samout", repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- checks --------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mixer not in MIXERS:
            raise ValueError(
                f"unknown mixer {self.mixer!r}: choose one of {', '.join(MIXERS)}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}): change one of them, e.g. hidden_size="
                f"{self.num_heads * max(1, round(self.hidden_size / self.num_heads))}"
            )
        if self.padding_idx is not None:
            if not isinstance(self.padding_idx, int) or isinstance(self.padding_idx, bool):
                raise ValueError(f"padding_idx must be an integer or null, got {self.padding_idx!r}")
            if not 0 <= self.padding_idx < self.vocab_size:
                raise ValueError(
                    f"padding_idx ({self.padding_idx}) must lie in [0, vocab_size="
                    f"{self.vocab_size}): change padding_idx or use null"
                )
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}: choose one of {', '.join(KERNELS)}")
        self._validate_layers()
        for name in ("tie_word_embeddings", "final_norm", "recompute", "max_decay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model_type != "samout":
            raise ValueError(f"model_type must be 'samout', got {self.model_type!r}")

    def _validate_layers(self) -> None:
        if self.layer_types is not None and self.attention_every is not None:
            raise ValueError("give layer_types or attention_every, not both")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types must list one kind per layer ({self.num_layers}), got {self.layer_types!r}"
                )
            kinds = [LAYER_TYPE_ALIASES.get(kind, kind) for kind in self.layer_types]
            for kind in kinds:
                if kind not in LAYER_TYPES:
                    raise ValueError(f"unknown layer type {kind!r}: choose one of {', '.join(LAYER_TYPES)}")
            self.layer_types = kinds
        for name in ("attention_every", "attention_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if not isinstance(self.max_decay_init, (int, float)) or isinstance(self.max_decay_init, bool) \
                or not self.max_decay_init > 0:
            raise ValueError(f"max_decay_init must be a positive number, got {self.max_decay_init!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def resolved_layer_types(self) -> list[str]:
        """Each layer's kind, from `layer_types` or `attention_every`."""
        if self.layer_types is not None:
            return list(self.layer_types)
        every = self.attention_every
        return ["attention" if every and (i + 1) % every == 0 else "maxstate" for i in range(self.num_layers)]

    # -- presets -------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SamOutConfig:
        """A named preset (see `PRESETS`), with optional overrides of any field."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

