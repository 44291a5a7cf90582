"""`SamOutTokenizer`: a samout `tokenizer.json` as a `transformers` fast tokenizer.

The special tokens are fixed across samout (`<|pad|>` = 0, `<|endoftext|>` = 1), so
they are class defaults and a run directory needs no `tokenizer_config.json`. Padding
is on the left, the only padding SamOut's generation handles (see modeling_samout).

Like samout's own generator, encoding puts `<|endoftext|>` before the text (documents
follow it in the training stream), so a prompt is seen the way training saw documents
start; `add_special_tokens=False` gives the bare ids of tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from samout.run_dir import TOKENIZER_NAME
from samout.tokenizer import EOT_TOKEN, PAD_TOKEN


class SamOutTokenizer(PreTrainedTokenizerFast):
    padding_side = "left"

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("pad_token", PAD_TOKEN)
        kwargs.setdefault("eos_token", EOT_TOKEN)
        kwargs.setdefault("bos_token", EOT_TOKEN)
        kwargs.setdefault("unk_token", None)
        kwargs.setdefault("add_bos_token", True)
        super().__init__(*args, **kwargs)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs):
        # transformers rebuilds subclasses that define __init__ from the bare vocab and
        # merges, dropping the byte-level pre-tokenizer and decoder; this __init__ only
        # sets defaults, so load tokenizer.json whole, as the base class does.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers bakes the leading <|endoftext|> into tokenizer.json as a
        # post-processor; keep the file samout's (bare ids for `tokenizers` users):
        # this class adds the token again when it loads the file.
        path = Path(save_directory) / TOKENIZER_NAME
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if (data.get("post_processor") or {}).get("type") == "TemplateProcessing":
                data["post_processor"] = None
                path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return files
