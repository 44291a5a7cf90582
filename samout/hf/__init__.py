"""Hugging Face `transformers` integration (the optional extra `samout[hf]`).

    import samout                                   # registers "samout" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(RUN_DIR)
    tokenizer = AutoTokenizer.from_pretrained(RUN_DIR)

`import samout` does not import transformers (it is slow to import): it registers when
transformers is imported, before or after samout (see `samout._hf_hook`).
"""

from __future__ import annotations

from samout.hf.cache import SamOutCache
from samout.hf.configuration_samout import SamOutHFConfig
from samout.hf.modeling_samout import SamOutForCausalLM, SamOutPreTrainedModel
from samout.hf.tokenization_samout import SamOutTokenizer

_registered = False


def register() -> None:
    """Register SamOut with AutoConfig, AutoModelForCausalLM and AutoTokenizer (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register(SamOutHFConfig.model_type, SamOutHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(SamOutHFConfig, SamOutForCausalLM, exist_ok=True)
    AutoTokenizer.register(SamOutHFConfig, tokenizer_class=SamOutTokenizer, exist_ok=True)
    _registered = True


register()

__all__ = ["SamOutCache", "SamOutForCausalLM", "SamOutHFConfig", "SamOutPreTrainedModel",
           "SamOutTokenizer", "register"]
