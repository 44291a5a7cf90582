"""TransformerConfig: the softmax baseline of docs/architecture.md
("The Transformer baseline (seed 004)"), its two named styles, and the rule that
sizes it against a SamOut config.

Styles (`BASELINE_STYLES`, `--baseline` of every benchmark):

    modern    a Llama-style decoder: rotary positions, RMSNorm, SwiGLU FFN, no biases
              (what people use today; the benchmarks' default and the training preset's)
    seed-004  the faithful 2017 baseline of seed 004: sinusoidal positions added to the
              embedding, LayerNorm with biases, ReLU FFN, biases everywhere (the
              dataclass defaults, so a config.json written before the styles existed,
              without the new keys, loads as exactly this model)

Matching rule (`match_transformer_to`): keep the SamOut config's vocabulary, width,
layers, heads, padding index and head tying; choose the FFN width F so that the
non-embedding parameter counts agree. Per layer the Transformer has `4 D²` (fused QKV +
output projection) `+ 4 D` with biases; an FFN of `2 D F` (ReLU/GELU: two matrices) or
`3 D F` (SwiGLU: gate, up and down), `+ F + D` or `+ 2 F + D` with biases; and two norms of
`2 D` (LayerNorm with bias) or `D` (RMSNorm, or LayerNorm without bias); plus one more
norm at the end (pre-norm). F is solved from that linear equation, rounded to a multiple
of 8 when that stays within the tolerance (kernel-friendly widths), else to the nearest
integer.

RoPE scaling (`rope_scaling`, rotary positions only): run a model beyond the length it
was trained at by stretching its rotary frequencies, without retraining:

    {"type": "ntk", "factor": s}     NTK-aware: rope_theta * s ** (dh / (dh - 2))
    {"type": "linear", "factor": s}  position interpolation: positions / s
    {"type": "yarn", "factor": s, "original_max_position_embeddings": L}
                                     YaRN (Peng et al. 2023): frequencies whose wavelength
                                     is long against L are interpolated by s, short ones
                                     kept, a linear ramp between (beta_fast 32, beta_slow 1),
                                     and attention logits scaled by (0.1 ln s + 1)²

It is an inference option (`Transformer.set_rope_scaling`), e.g. factor = eval length /
training length; a saved config keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from samout.config import JsonConfig, SamOutConfig

POSITIONALS = ("sinusoidal", "rotary")
NORMS = ("pre", "post")
NORM_TYPES = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "swiglu")
ROPE_SCALINGS = ("ntk", "linear", "yarn")

# The named baselines: the option fields each sets (everything else is sized by matching).
BASELINE_STYLES: dict[str, dict[str, Any]] = {
    "modern": dict(positional="rotary", norm="pre", norm_type="rmsnorm", activation="swiglu",
                   bias=False),
    "seed-004": dict(positional="sinusoidal", norm="pre", norm_type="layernorm", activation="relu",
                     bias=True),
}
DEFAULT_BASELINE = "modern"  # of the benchmarks and of `TransformerConfig.from_preset`

# Fields a Transformer takes over from the SamOut config it is compared with.
SHARED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "padding_idx", "tie_word_embeddings")

# How close `match_transformer_to` must get (the issue's 2% bound).
MATCH_TOLERANCE = 0.02


@dataclass
class TransformerConfig(JsonConfig):
    """Sizes and options of the softmax baseline.

    Defaults (the `seed-004` style): sinusoidal positions added to the embedding (as in
    seed 004), pre-norm layers with a final LayerNorm (the standard, stable form), ReLU
    FFN as the seed describes, biases, untied head like SamOut's seed presets. The
    `modern` style (BASELINE_STYLES) is rotary + RMSNorm + SwiGLU without biases;
    `from_preset` and `match_transformer_to` build that one unless told otherwise.
    `max_position_embeddings` is the longest context (cache included) the model accepts;
    positions are computed on the fly, so raising it costs no memory.
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
    norm_type: str = "layernorm"
    bias: bool = True
    rope_scaling: dict[str, Any] | None = None
    padding_idx: int | None = 0
    tie_word_embeddings: bool = False
    model_type: str = field(default="transformer", repr=False)
    # Keys `from_preset` and `from_dict` take besides the fields (a training config's `baseline:`).
    preset_options: ClassVar[tuple[str, ...]] = ("baseline",)

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
        for name, allowed in (("positional", POSITIONALS), ("norm", NORMS), ("activation", ACTIVATIONS),
                              ("norm_type", NORM_TYPES)):
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
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")
        check_rope_scaling(self.rope_scaling, self.positional)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.model_type != "transformer":
            raise ValueError(f"model_type must be 'transformer', got {self.model_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def style(self) -> str:
        """"modern" or "seed-004" when the options are exactly that style's, else "custom"."""
        for name, fields in BASELINE_STYLES.items():
            if all(getattr(self, k) == v for k, v in fields.items()):
                return name
        return "custom"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """From config.json's fields; a missing option keeps its default, so a config saved
        before the styles existed loads as the seed-004 model it was. A `baseline` key
        (a training config's) sets that style's options under the given ones."""
        if isinstance(data, dict) and "baseline" in data:
            data = dict(data)
            data = {**style_fields(data.pop("baseline")), **data}
        return super().from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """The Transformer matched to SamOut preset `name` (see `match_transformer_to`), so
        `samout train --arch transformer --preset small` trains the comparison model, in
        the `modern` style unless `baseline="seed-004"` is given (a config file's
        `baseline:` key). Overrides of the fields both share (vocab_size, hidden_size,
        num_layers, num_heads, padding_idx, tie_word_embeddings) resize the SamOut first;
        the rest (positional, norm, ...) are Transformer options over the style's. An
        explicit ffn_hidden_size skips matching."""
        baseline = overrides.pop("baseline", DEFAULT_BASELINE)
        shared = {k: v for k, v in overrides.items() if k in SHARED_FIELDS}
        rest = {k: v for k, v in overrides.items() if k not in SHARED_FIELDS}
        samout_config = SamOutConfig.from_preset(name, **shared)
        if "ffn_hidden_size" in rest:
            return cls(**{k: getattr(samout_config, k) for k in SHARED_FIELDS},
                       **{**style_fields(baseline), **rest})
        return match_transformer_to(samout_config, baseline=baseline, **rest)

    def non_embedding_parameters(self) -> int:
        """Exact count of everything but the embedding and the output head."""
        fixed, per_f = _parameter_terms(self.to_dict())
        return fixed + self.num_layers * per_f * self.ffn_hidden_size


def style_fields(baseline: str) -> dict[str, Any]:
    """The option fields of a named baseline style (BASELINE_STYLES)."""
    if not isinstance(baseline, str) or baseline not in BASELINE_STYLES:
        raise ValueError(f"unknown baseline {baseline!r}: choose one of {', '.join(BASELINE_STYLES)}")
    return dict(BASELINE_STYLES[baseline])


def check_rope_scaling(scaling: Any, positional: str) -> None:
    """None, or {"type": ntk|linear|yarn, "factor": > 0, yarn: "original_max_position_embeddings"}."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("type") not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling must be null or {{\"type\": one of {', '.join(ROPE_SCALINGS)}, "
                         f"\"factor\": F}}, got {scaling!r}")
    if positional != "rotary":
        raise ValueError("rope_scaling needs rotary positions (positional: rotary)")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ValueError(f"rope_scaling factor must be a positive number, got {factor!r}")
    unknown = set(scaling) - {"type", "factor", "original_max_position_embeddings"}
    if unknown:
        raise ValueError(f"unknown rope_scaling key(s): {', '.join(sorted(unknown))}")
    if scaling["type"] == "yarn":
        length = scaling.get("original_max_position_embeddings")
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ValueError("yarn rope_scaling needs original_max_position_embeddings (the training "
                             f"length), a positive integer; got {length!r}")


def _parameter_terms(fields: dict[str, Any]) -> tuple[int, int]:
    """(parameters that do not depend on the FFN width F, parameters per unit of F in one
    layer) of a config's fields (dataclass defaults for missing ones)."""
    defaults = {f.name: f.default for f in TransformerConfig.__dataclass_fields__.values()}
    c = {**defaults, **fields}
    d, n, bias = c["hidden_size"], c["num_layers"], c["bias"]
    norm = 2 * d if c["norm_type"] == "layernorm" and bias else d
    attention = 4 * d * d + (4 * d if bias else 0)
    matrices = 3 if c["activation"] == "swiglu" else 2
    ffn_fixed = d if bias else 0
    per_f = matrices * d + ((matrices - 1) if bias else 0)
    fixed = n * (attention + ffn_fixed + 2 * norm) + (norm if c["norm"] == "pre" else 0)
    return fixed, per_f


def samout_non_embedding_parameters(config: SamOutConfig) -> int:
    """Non-embedding parameters of a SamOut config, counted on the real module (built on
    the meta device, so even the 85M preset costs no memory)."""
    import torch

    from samout.models.samout import SamOut

    with torch.device("meta"):
        return SamOut(config).num_parameters(exclude_embeddings=True)


def match_transformer_to(samout_config: SamOutConfig, baseline: str = DEFAULT_BASELINE,
                         **overrides: Any) -> TransformerConfig:
    """A TransformerConfig whose non-embedding parameter count is within 2% of
    `samout_config`'s: same vocab, width, layers, heads; FFN width solved for (see the
    module docstring). `baseline` names the style (BASELINE_STYLES: "modern", the
    default, or "seed-004"); `overrides` set any other field (e.g. positional="rotary",
    max_position_embeddings=32768) over the style's; overriding a size the rule keeps is
    allowed, and the FFN width is then solved for those sizes."""
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
    base.update(style_fields(baseline))
    base.update(overrides)
    target = samout_non_embedding_parameters(samout_config)
    fixed, per_f = _parameter_terms(base)  # everything but the FFN's F terms; per unit of F
    d, n = base["hidden_size"], base["num_layers"]
    exact = (target - fixed) / (n * per_f)
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
