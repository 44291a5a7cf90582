"""`SamOutTokenizer`: a samout `tokenizer.json` as a `transformers` fast tokenizer.

The special tokens are fixed across samout (`<|pad|>` = 0, `<|endoftext|>` = 1), so
they are class defaults and a run directory needs no `tokenizer_config.json`. Padding
is on the left, the only padding SamOut's generation handles (see modeling_samout).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD_TOKEN, EOT_TOKEN = "<|pad|>", "<|endoftext|>"


class SamOutTokenizer(PreTrainedTokenizerFast):
    padding_side = "left"

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("pad_token", PAD_TOKEN)
        kwargs.setdefault("eos_token", EOT_TOKEN)
        kwargs.setdefault("bos_token", EOT_TOKEN)
        kwargs.setdefault("unk_token", None)
        super().__init__(*args, **kwargs)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs):
        # transformers rebuilds subclasses that define __init__ from the bare vocab and
        # merges, dropping the byte-level pre-tokenizer and decoder; this __init__ only
        # sets defaults, so load tokenizer.json whole, as the base class does.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)
