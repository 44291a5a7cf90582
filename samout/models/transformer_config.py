"""TransformerConfig: the softmax baseline of docs/architecture.md
("The Transformer baseline (seed 004)"), and the rule that
sizes it against a SamOut config.

Matching rule (`match_transformer_to`): keep the SamOut config's vocabulary, width,
layers, heads, padding index and head tying; choose the FFN width F so that the
non-embedding parameter counts agree. Per layer the Transformer has
`4 D² + 4 D` (fused QKV + output projection, with biases) `+ 2 D F + F + D` (two-layer
FFN) `+ 4 D` (two LayerNorms), plus `2 D` for the final LayerNorm (pre-norm), so F is solved from
a linear equation, rounded to a multiple of 8 when that stays within the tolerance
(kernel-friendly widths), else to the nearest integer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from samout.config import JsonConfig, SamOutConfig

POSITIONALS = ("sinusoidal", "rotary")
NORMS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu")

# Fields a Transformer takes over from the SamOut config it is compared with.
SHARED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "padding_idx", "tie_word_embeddings")

# How close `match_transformer_to` must get (the 2% bound).
MATCH_TOLERANCE = 0.02


@dataclass
class TransformerConfig(JsonConfig):
    """Sizes and options of the softmax baseline.

    Defaults: sinusoidal positions added to the embedding (as in seed 004), pre-norm
    layers with a final LayerNorm (the standard, stable form), ReLU FFN as the seed
    describes, untied head like SamOut's seed presets. `max_position_embeddings` is the
    longest context (cache included) the model accepts; positions are computed on the
    fly, so raising it costs no memory.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    ffn_hidden_size: int = 1024
    max_position_embeddings: int = 4096
    positional: str = "sinusoidal"
    norm: str = "pre"
    activation: str = "relu"
    rope_theta: float = 10000.0
    padding_idx: int | None = 0
    tie_word_embeddings: bool = False
    model_type: str = field(default="transformer", repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        for name, allowed in (("positional", POSITIONALS), ("norm", NORMS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}"
                )
        if self.positional == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {self.head_dim}")
        if self.positional == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"sinusoidal positions need an even hidden_size, got {self.hidden_size}")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.padding_idx is not None and not (
            isinstance(self.padding_idx, int) and 0 <= self.padding_idx < self.vocab_size
        ):
            raise ValueError(
                f"padding_idx ({self.padding_idx!r}) must lie in [0, vocab_size={self.vocab_size})"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.model_type != "transformer":
            raise ValueError(f"model_type must be 'transformer', got {self.model_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """The Transformer matched to SamOut preset `name` (see `match_transformer_to`), so
        `samout train --arch transformer --preset small` trains the comparison model.
        Overrides of the fields both share (vocab_size, hidden_size, num_layers, num_heads,
        padding_idx, tie_word_embeddings) resize the SamOut first; the rest (positional,
        norm, ...) are Transformer options. An explicit ffn_hidden_size skips matching."""
        shared = {k: v for k, v in overrides.items() if k in SHARED_FIELDS}
        rest = {k: v for k, v in overrides.items() if k not in SHARED_FIELDS}
        samout_config = SamOutConfig.from_preset(name, **shared)
        if "ffn_hidden_size" in rest:
            return cls(**{k: getattr(samout_config, k) for k in SHARED_FIELDS}, **rest)
        return match_transformer_to(samout_config, **rest)

    def non_embedding_parameters(self) -> int:
        """Exact count of everything but the embedding and the output head."""
        d, f = self.hidden_size, self.ffn_hidden_size
        per_layer = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
        return self.num_layers * per_layer + (2 * d if self.norm == "pre" else 0)


def samout_non_embedding_parameters(config: SamOutConfig) -> int:
    """Non-embedding parameters of a SamOut config, counted on the real module (built on
    the meta device, so even the 85M preset costs no memory)."""
    import torch

    from samout.models.samout import SamOut

    with torch.device("meta"):
        return SamOut(config).num_parameters(exclude_embeddings=True)


def match_transformer_to(samout_config: SamOutConfig, **overrides: Any) -> TransformerConfig:
    """A TransformerConfig whose non-embedding parameter count is within 2% of
    `samout_config`'s: same vocab, width, layers, heads; FFN width solved for (see the
    module docstring). `overrides` set any other field (e.g. positional="rotary",
    max_position_embeddings=32768); overriding a size the rule keeps is allowed, and
    the FFN width is then solved for those sizes."""
    if "ffn_hidden_size" in overrides:
        raise ValueError("match_transformer_to chooses ffn_hidden_size itself; do not pass it")
    base = dict(
        vocab_size=samout_config.vocab_size,
        hidden_size=samout_config.hidden_size,
        num_layers=samout_config.num_layers,
        num_heads=samout_config.num_heads,
        padding_idx=samout_config.padding_idx,
        tie_word_embeddings=samout_config.tie_word_embeddings,
    )
    base.update(overrides)
    target = samout_non_embedding_parameters(samout_config)
    d, n = base["hidden_size"], base["num_layers"]
    final_norm = 2 * d if base.get("norm", "pre") == "pre" else 0
    fixed = n * (4 * d * d + 4 * d + d + 4 * d) + final_norm  # everything but the FFN's F terms
    exact = (target - fixed) / (n * (2 * d + 1))
    if exact < 1:
        raise ValueError(
            f"cannot match a SamOut model of {target:,} non-embedding parameters with "
            f"{n} attention layers of width {d}: attention alone is larger; use fewer layers"
        )
    for width in (max(8, 8 * round(exact / 8)), max(1, round(exact))):
        config = TransformerConfig(**base, ffn_hidden_size=width)
        if abs(config.non_embedding_parameters() - target) <= MATCH_TOLERANCE * target:
            return config
    raise ValueError(  # only reachable for degenerate sizes
        f"cannot match {target:,} non-embedding parameters within {MATCH_TOLERANCE:.0%}"
        f" (closest: {config.non_embedding_parameters():,})"
    )
