"""The seed author's OpenASH tokenizer: jieba words over a vocabulary with "agent" codes.

The author's `open_ash_voc.py` (dfytensor/OpenASH) segments text with jieba's default
dictionary, then maps each word:
- a word in the main vocabulary -> its id;
- a word with an agent code "itj" -> two tokens ts{i}, te{j}; with "itjrz" -> three
  tokens rs{i}, rc{j}, re{z} (the code tokens sit at the end of the vocabulary, from ts0);
- any other word -> character by character, the same way; an unknown character -> 10
  (<|unk|>). As in the author's code, characters found directly in the vocabulary are
  emitted before the agent-coded and unknown characters of the same word (the models
  were trained on exactly that order, so it is kept).
Decoding is the author's state machine over the code tokens; special tokens decode to
their text unless `skip_special_tokens=True`.

`OpenAshVocab` offers the part of `tokenizers.Tokenizer`'s interface that samout uses
(`encode(text).ids`, `decode`, `token_to_id`, ...), so `samout.tokenizer.load_tokenizer`
returns one for a directory holding `openash_vocab.json`. jieba is the optional extra
`samout[zh]`, imported when text is first encoded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from samout.errors import SamoutError
from samout.files import VOCAB_NAME  # noqa: F401  (the file a run directory holds instead of tokenizer.json)

# The author's encode() writes 10 for a character it cannot encode (<|unk|> in their list).
UNK_ID = 10
PAD_TOKEN, IM_START, IM_END, USER, AGENT, SYSTEM = (
    "<|pad|>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|agent|>", "<|system|>")
# The author's special tokens (open_ash_voc.py), ids 0.. in this order.
SPECIAL_TOKENS = [
    "<|pad|>", "<|im_start|>", "<|im_end|>", "<|think|>", "<|end_think|>", "<|user|>", "<|agent|>",
    "<|system|>", "<|func|>", "<|args|>", "<|unk|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>",
    "<|audio_end|>", "<|audio_pad|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|tools|>", "<|end_tools|>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>",
]
# The author's chat format (open_ash_infer.py): a turn is <|im_start|><|role|> text <|im_end|>;
# the assistant's role token is <|agent|>; generation stops at <|im_end|> or <|pad|>.
# Tools (samout's extension; the author's tool format is not published): the function
# definitions as a system turn between the vocabulary's <|tools|> and <|end_tools|>, one JSON
# object a line; an assistant's calls as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# after its text (samout.chat.tools), and a tool's result as a user turn
# <tool_response>RESULT</tool_response>, with the vocabulary's special tokens as the markers.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|><|system|><|tools|>"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}<|end_tools|><|im_end|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|im_start|><|system|>{{ message['content'] }}<|im_end|>"
    "{% elif message['role'] == 'user' %}<|im_start|><|user|>{{ message['content'] }}<|im_end|>"
    "{% elif message['role'] == 'assistant' %}<|im_start|><|agent|>"
    "{% if message['content'] is not none %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>{\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{{ fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>"
    "{% elif message['role'] == 'tool' %}<|im_start|><|user|><tool_response>{{ message['content'] }}"
    "</tool_response><|im_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|><|agent|>{% endif %}"
)
# The template before it rendered tools (`samout.chat.template.load_chat_template` upgrades it).
CHAT_TEMPLATE_BEFORE_TOOLS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|im_start|><|system|>{{ message['content'] }}<|im_end|>"
    "{% elif message['role'] == 'user' %}<|im_start|><|user|>{{ message['content'] }}<|im_end|>"
    "{% elif message['role'] == 'assistant' %}<|im_start|><|agent|>{{ message['content'] }}<|im_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|><|agent|>{% endif %}"
)
_KEYS = ("token_to_id", "id_to_token", "agent_token_to_token_id", "agent_token_id_to_token")


@dataclass
class Encoding:
    """What samout reads of a `tokenizers.Encoding`."""

    ids: list[int] = field(default_factory=list)


def read_vocab(path: str | Path) -> dict:
    """The author's vocabulary JSON, checked; one-line SamoutError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"OpenASH vocabulary not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SamoutError(f"{path} is not an OpenASH vocabulary (not valid JSON: {err})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), dict) for k in _KEYS):
        raise SamoutError(f"{path} is not an OpenASH vocabulary (it needs the objects {', '.join(_KEYS)})")
    if data["token_to_id"].get("ts0") is None or data["token_to_id"].get(PAD_TOKEN) != 0:
        raise SamoutError(f"{path} is not an OpenASH vocabulary: it lacks the agent code token ts0 "
                          f"or {PAD_TOKEN} = 0")
    return data


class OpenAshVocab:
    """The author's tokenizer with the interface samout uses from `tokenizers.Tokenizer`."""

    def __init__(self, data: dict) -> None:
        self._token_to_id: dict[str, int] = {str(k): int(v) for k, v in data["token_to_id"].items()}
        self._id_to_token: dict[int, str] = {int(k): str(v) for k, v in data["id_to_token"].items()}
        self._agent_code: dict[str, str] = data["agent_token_to_token_id"]
        self._agent_word: dict[str, str] = data["agent_token_id_to_token"]
        self.ts0 = self._token_to_id["ts0"]
        self.special_tokens = [t for t in SPECIAL_TOKENS if t in self._token_to_id]
        self.special_ids = {self._token_to_id[t] for t in self.special_tokens}
        # The author's pretraining documents start bare, and their generation stops at
        # <|im_end|> or <|pad|> (see samout.tokenizer.document_prefix / end_ids).
        self.document_prefix: list[int] = []
        self.end_ids = frozenset(self._token_to_id[t] for t in (IM_END, PAD_TOKEN) if t in self._token_to_id)
        self._jieba = None

    @classmethod
    def from_file(cls, path: str | Path) -> OpenAshVocab:
        return cls(read_vocab(path))

    # -- the author's algorithm ---------------------------------------------
    @property
    def jieba(self):
        if self._jieba is None:
            try:
                import jieba
            except ModuleNotFoundError:
                raise SamoutError("the OpenASH tokenizer needs jieba: pip install 'samout[zh]'") from None
            jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO
            self._jieba = jieba.Tokenizer()  # the default dictionary, as the author's code
        return self._jieba

    def _agent_ids(self, word: str) -> list[int]:
        code = self._agent_code[word]
        if "r" in code:
            i, j, z = code.replace("t", "_").replace("r", "_").split("_")
            return [self._token_to_id["rs" + i], self._token_to_id["rc" + j], self._token_to_id["re" + z]]
        i, j = code.split("t")
        return [self._token_to_id["ts" + i], self._token_to_id["te" + j]]

    def encode_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.jieba.lcut(text):
            if word in self._token_to_id:
                ids.append(self._token_to_id[word])
            elif word in self._agent_code:
                ids += self._agent_ids(word)
            else:
                later: list[int] = []  # the author's order: direct characters first
                for ch in word:
                    if ch in self._token_to_id:
                        ids.append(self._token_to_id[ch])
                    elif ch in self._agent_code:
                        later += self._agent_ids(ch)
                    else:
                        later.append(UNK_ID)
                ids += later
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text, code = [], ""
        for i in ids:
            i = int(i)
            token = self._id_to_token.get(i)
            if token is None or (skip_special_tokens and i in self.special_ids):
                continue
            if i < self.ts0:
                text.append(token)
            elif "t" in token:  # ts*/te*
                if "ts" in token:
                    code = token.replace("ts", "")
                elif "te" in token:
                    code += "t" + token.replace("te", "")
                    text.append(self._agent_word.get(code, ""))
            elif "rs" in token:
                code = token.replace("rs", "")
            elif "rc" in token:
                code += "t" + token.replace("rc", "") + "r"
            elif "re" in token:
                code += token.replace("re", "")
                text.append(self._agent_word.get(code, ""))
        return "".join(text)

    # -- tokenizers.Tokenizer's interface -------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        return Encoding(self.encode_ids(text))

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list[Encoding]:
        return [self.encode(t) for t in texts]

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._id_to_token.get(int(idx))

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def get_vocab_size(self) -> int:
        return max(self._id_to_token) + 1
