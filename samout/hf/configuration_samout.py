"""`SamOutHFConfig`: the Hugging Face view of a samout `config.json`.

It holds exactly the fields of `samout.config.SamOutConfig` (a test keeps the two in
step) plus the token ids `generate()` needs, so a samout run directory's config.json
loads as is, and a config saved by `save_pretrained` loads back into samout.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from samout.config import DEFAULT_MAX_DECAY_INIT, DEFAULT_MIXER, FORMAT_VERSION, SamOutConfig

# Fixed by the project's tokenizers: <|pad|> = 0, <|endoftext|> = 1.
PAD_ID, EOS_ID = 0, 1


class SamOutHFConfig(PreTrainedConfig):
    """Sizes and options of a SamOut model (see `samout.config.SamOutConfig`)."""

    model_type = "samout"
    # Names other Hugging Face code looks for.
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    mixer: str = DEFAULT_MIXER
    padding_idx: int | None = 0
    ffn_mult: int = 1
    tie_word_embeddings: bool = False
    final_norm: bool = False
    kernel: str = "auto"
    recompute: bool = False
    layer_types: list[str] | None = None
    attention_every: int | None = None
    attention_window: int | None = None
    max_decay: bool = False
    max_decay_init: float = DEFAULT_MAX_DECAY_INIT
    format_version: int = FORMAT_VERSION
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = EOS_ID
    eos_token_id: int | list[int] | None = EOS_ID
    use_cache: bool = True

    def __post_init__(self, **kwargs) -> None:
        # samout's own checks give the same one-line errors as everywhere else.
        self.to_samout_config()
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        # transformers checks `layer_types` against its own kinds (validate_layer_type);
        # SamOutConfig checks samout's ("maxstate", "attention", which transformers
        # renames "full_attention" on loading). Every other check of transformers runs.
        for validator in getattr(PreTrainedConfig, "__class_validators__", []):
            if validator.__name__ != "validate_layer_type":
                validator(self)
        self.to_samout_config()

    def to_samout_config(self) -> SamOutConfig:
        """The samout config for `samout.models.samout.SamOut` (validated)."""
        return SamOutConfig.from_dict({f: getattr(self, f) for f in SAMOUT_FIELDS} | {
            "format_version": self.format_version})

    @classmethod
    def from_samout_config(cls, config: SamOutConfig, **kwargs) -> SamOutHFConfig:
        data = config.to_dict()
        data.pop("model_type", None)
        return cls(**data, **kwargs)


SAMOUT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mixer", "padding_idx",
                 "ffn_mult", "tie_word_embeddings", "final_norm", "kernel", "recompute", "layer_types",
                 "attention_every", "attention_window", "max_decay", "max_decay_init")
