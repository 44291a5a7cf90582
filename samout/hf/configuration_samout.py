"""`SamOutHFConfig`: the Hugging Face view of a samout `config.json`.

Its fields are those of `samout.config.SamOutConfig` (types and defaults copied from that
dataclass when this module is imported, so the two cannot drift apart) plus the token ids
`generate()` needs, so a samout run directory's config.json loads as is, and a config saved
by `save_pretrained` loads back into samout.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from transformers import PreTrainedConfig

from samout.config import FORMAT_VERSION, SamOutConfig
from samout.tokenizer import EOT_ID, PAD_ID


def _samout_fields() -> dict[str, tuple[Any, Any]]:
    """SamOutConfig's fields but model_type (the HF config has its own): name -> (type, default)."""
    hints = typing.get_type_hints(SamOutConfig)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(SamOutConfig)
            if f.name != "model_type"}


SAMOUT_FIELDS = tuple(_samout_fields())


class _SamOutHFConfigBase(PreTrainedConfig):
    """What the HF config adds to SamOutConfig's fields (added by `SamOutHFConfig` below)."""

    model_type = "samout"
    # Names other Hugging Face code looks for.
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    format_version: int = FORMAT_VERSION
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = EOT_ID
    eos_token_id: int | list[int] | None = EOT_ID
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


# transformers turns every PreTrainedConfig subclass into a dataclass of its annotated
# fields when the class is created, so SamOutConfig's fields are put in its namespace then.
SamOutHFConfig = type("SamOutHFConfig", (_SamOutHFConfigBase,), {
    "__module__": __name__,
    "__qualname__": "SamOutHFConfig",
    "__doc__": "Sizes and options of a SamOut model (the fields of `samout.config.SamOutConfig`).",
    "__annotations__": {name: kind for name, (kind, _) in _samout_fields().items()},
    **{name: default for name, (_, default) in _samout_fields().items()},
})
