"""Hugging Face `transformers` integration (the optional extra `samout[hf]`).

    import samout                                   # registers "samout" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(RUN_DIR)
    tokenizer = AutoTokenizer.from_pretrained(RUN_DIR)

In a process that never imports samout, a run directory loads by path with
`trust_remote_code=True` (its config.json's auto_map points at thin modules that import
the installed samout; see `samout.remote_code`).

`import samout` does not import transformers (it is slow to import): it registers when
transformers is imported, before or after samout (see `samout._hf_hook`).
"""

from __future__ import annotations

from samout.hf.cache import SamOutCache
from samout.hf.configuration_samout import SamOutHFConfig
from samout.hf.modeling_samout import SamOutForCausalLM, SamOutPreTrainedModel
from samout.hf.tokenization_samout import OpenAshTokenizer, SamOutTokenizer

_registered = False


def register() -> None:
    """Register SamOut with AutoConfig, AutoModelForCausalLM and AutoTokenizer (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register(SamOutHFConfig.model_type, SamOutHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(SamOutHFConfig, SamOutForCausalLM, exist_ok=True)
    # The slow class is registered by name too: an OpenASH directory's tokenizer_config.json
    # names it. The config maps to the BPE tokenizer, samout's own.
    AutoTokenizer.register(SamOutHFConfig, tokenizer_class=SamOutTokenizer,
                           slow_tokenizer_class=OpenAshTokenizer, exist_ok=True)
    _registered = True


register()

__all__ = ["OpenAshTokenizer", "SamOutCache", "SamOutForCausalLM", "SamOutHFConfig",
           "SamOutPreTrainedModel", "SamOutTokenizer", "register"]
