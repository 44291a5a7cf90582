"""samout's tokenizers as `transformers` tokenizers.

`SamOutTokenizer`: a samout `tokenizer.json` (byte-level BPE) as a fast tokenizer. The
special tokens are fixed across samout (`<|pad|>` = 0, `<|endoftext|>` = 1), so they are
class defaults. Padding is on the left, the only padding SamOut's generation handles.

Encoding gives the bare ids of tokenizer.json, like GPT-2's tokenizer: no token is added.
Tools that score text add the document prefix themselves from `bos_token`
(`<|endoftext|>`, which precedes every document in samout's training stream):
lm-evaluation-harness prepends `prefix_token_id` (= bos) to each rolling-loglikelihood
document and to empty contexts, so a tokenizer that added one too would make every
document score one extra token. To condition generation the way samout's own generator
does, put `<|endoftext|>` before the prompt: `[tok.bos_token_id] + tok(prompt).input_ids`.

`OpenAshTokenizer`: the seed author's jieba + agent-code vocabulary
(`samout.openash_tokenizer`) as a slow tokenizer; its special tokens are recognised in
text (chat templates), everything else is segmented exactly as the author's code does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from samout.files import CONFIG_NAME, TOKENIZER_NAME
from samout.openash_tokenizer import IM_END, SPECIAL_TOKENS, VOCAB_NAME, OpenAshVocab
from samout.tokenizer import EOT_TOKEN, PAD_TOKEN  # the OpenASH vocabulary's pad is the same "<|pad|>"


class SamOutTokenizer(PreTrainedTokenizerFast):
    padding_side = "left"

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("pad_token", PAD_TOKEN)
        kwargs.setdefault("eos_token", EOT_TOKEN)
        kwargs.setdefault("bos_token", EOT_TOKEN)
        kwargs.setdefault("unk_token", None)
        kwargs.setdefault("add_bos_token", False)
        super().__init__(*args, **kwargs)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs):
        # transformers rebuilds subclasses that define __init__ from the bare vocab and
        # merges, dropping the byte-level pre-tokenizer and decoder; this __init__ only
        # sets defaults, so load tokenizer.json whole, as the base class does.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # Keep tokenizer.json samout's (bare ids for `tokenizers` users) should transformers
        # bake a template post-processor into it.
        path = Path(save_directory) / TOKENIZER_NAME
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if (data.get("post_processor") or {}).get("type") == "TemplateProcessing":
                data["post_processor"] = None
                path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        _write_hf_files(save_directory)
        return files


class OpenAshTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_NAME}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str, **kwargs) -> None:
        self.vocab = OpenAshVocab.from_file(vocab_file)
        self.vocab_file = vocab_file
        kwargs.setdefault("pad_token", PAD_TOKEN)
        kwargs.setdefault("eos_token", IM_END)  # the end of a turn, where the author's generation stops
        kwargs.setdefault("bos_token", None)
        kwargs.setdefault("unk_token", "<|unk|>")
        kwargs.setdefault("extra_special_tokens",
                          [t for t in SPECIAL_TOKENS if self.vocab.token_to_id(t) is not None
                           and t not in (PAD_TOKEN, IM_END, "<|unk|>")])
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.vocab.get_vocab_size()

    def get_vocab(self) -> dict[str, int]:
        return self.vocab.get_vocab()

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self.vocab.id_to_token(i) for i in self.vocab.encode_ids(text)]

    def _convert_token_to_id(self, token: str) -> int:
        found = self.vocab.token_to_id(token)
        return self.vocab.token_to_id("<|unk|>") if found is None else found

    def _convert_id_to_token(self, index: int) -> str:
        return self.vocab.id_to_token(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.vocab.decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self.vocab.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_NAME)
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        _write_hf_files(save_directory)
        return files


def _write_hf_files(directory) -> None:
    # The auto_map entries, once the model's config.json is there too.
    from samout.remote_code import write_hf_files

    if (Path(directory) / CONFIG_NAME).is_file():
        write_hf_files(directory)
