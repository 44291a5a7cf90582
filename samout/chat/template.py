"""The chat template: conversations -> token ids, the same in samout and in Hugging Face.

A conversation renders as

    <|endoftext|><|system|>TEXT<|end|><|user|>TEXT<|end|><|assistant|>TEXT<|end|>...

and `add_generation_prompt` appends `<|assistant|>`. The role markers and `<|end|>` are
special tokens (`samout.tokenizer.CHAT_TOKENS`); each conversation starts with
`<|endoftext|>`, as every document does in the pretraining stream.

The template is a Jinja string stored Hugging Face style in `tokenizer_config.json`
("chat_template"), so `AutoTokenizer.from_pretrained(RUN_DIR).apply_chat_template(messages)`
gives exactly `render_ids(tokenizer, messages)`. samout renders the same Jinja string (with
the same Jinja settings as transformers) and splits the text at special tokens the way a
Hugging Face tokenizer does.

Forging: every special token starts with `<|`, and the template writes each `<|` inside a
message's content as `<` + U+200B (zero-width space) + `|`. No content can then spell any
special token, in samout or in Hugging Face (where special-token text in a rendered string
would otherwise become the token), and the text still reads the same.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samout.chat.tools import (
    CALL_END,
    CALL_START,
    RESPONSE_END,
    RESPONSE_START,
    check_tool_calls,
    check_tools,
)
from samout.errors import SamoutError
from samout.files import TOKENIZER_CONFIG_NAME
from samout.openash_tokenizer import CHAT_TEMPLATE as OPENASH_TEMPLATE
from samout.openash_tokenizer import CHAT_TEMPLATE_BEFORE_TOOLS as OPENASH_TEMPLATE_BEFORE_TOOLS
from samout.tokenizer import (
    ASSISTANT_TOKEN,
    CHAT_TOKENS,
    END_OF_TURN_TOKEN,
    EOT_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    SYSTEM_TOKEN,
    USER_TOKEN,
    encode_texts,
    has_chat_tokens,
    read_tokenizer_config,
)

ROLES = tuple(ROLE_TOKENS)
# Roles a message may have: a `tool` message (a tool's result) renders as a user turn.
MESSAGE_ROLES = (*ROLES, "tool")
# What `<|` inside content becomes: cannot start a special token, reads the same.
ESCAPED_MARKER_START = "<\u200b|"

_ESCAPE = "replace('<|', '" + ESCAPED_MARKER_START + "')"
# What samout's template writes before a conversation that has tools (as its own system turn,
# so that adding tools never changes how the messages render).
TOOLS_PREAMBLE = ("You can call these functions. To call one, reply with " + CALL_START
                  + '{"name": NAME, "arguments": {...}}' + CALL_END + ", one per call.\n<tools>\n")
TOOLS_POSTAMBLE = "</tools>"

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '" + SYSTEM_TOKEN + TOOLS_PREAMBLE + "' }}"
    "{% for tool in tools %}{{ (tool | tojson | " + _ESCAPE + ") ~ '\n' }}{% endfor %}"
    "{{ '" + TOOLS_POSTAMBLE + END_OF_TURN_TOKEN + "' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}"
    "{% endif %}"
    "{% set content = '' if message['content'] is none"
    " else (message['content'] | string | " + _ESCAPE + ") %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '" + USER_TOKEN + RESPONSE_START + "' ~ content ~ '" + RESPONSE_END + END_OF_TURN_TOKEN + "' }}"
    "{% else %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ content }}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{% set arguments = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) %}"
    "{{ ('\n' if content or not loop.first else '') ~ '" + CALL_START + "'"
    " ~ ('{\"name\": ' ~ (fn['name'] | tojson) ~ ', \"arguments\": ' ~ arguments ~ '}') | " + _ESCAPE
    + " ~ '" + CALL_END + "' }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '" + END_OF_TURN_TOKEN + "' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "' }}{% endif %}"
)

# samout's template before it rendered tools: the same text for every conversation without
# them, so a directory that stored it gets the current one (`load_chat_template`).
DEFAULT_CHAT_TEMPLATE_BEFORE_TOOLS = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ (message['content'] | string | replace('<|', '" + ESCAPED_MARKER_START
    + "')) ~ '" + END_OF_TURN_TOKEN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "' }}{% endif %}"
)
_UPGRADES = {DEFAULT_CHAT_TEMPLATE_BEFORE_TOOLS: DEFAULT_CHAT_TEMPLATE,
             OPENASH_TEMPLATE_BEFORE_TOOLS: OPENASH_TEMPLATE}


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """`messages` as a list of {"role", "content"} dicts (an assistant's may carry
    `tool_calls`, its content then optional; a `tool` message carries `tool_call_id`), or a
    SamoutError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise SamoutError(f"{where}: \"messages\" must be a non-empty list of "
                          "{\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise SamoutError(f"{where}: message {i} is not an object")
        out.append(check_message(message, f"{where}: message {i}"))
    return out


def check_message(message: dict, where: str) -> dict[str, Any]:
    """One message checked (see check_messages); `where` starts each error."""
    role, content = message.get("role"), message.get("content")
    if role not in MESSAGE_ROLES:
        raise SamoutError(f"{where} has unknown role {role!r} (use {', '.join(MESSAGE_ROLES)})")
    calls = message.get("tool_calls")
    if role == "assistant" and calls is not None:
        check_tool_calls(calls, f"{where} (assistant) tool_calls")
        if content is not None and not isinstance(content, str):
            raise SamoutError(f"{where} (assistant) has a \"content\" that is not text")
        return {"role": role, "content": content or "", "tool_calls": calls}
    if calls is not None:
        raise SamoutError(f"{where} ({role}) has tool_calls: only assistant messages make tool calls")
    if not isinstance(content, str):
        raise SamoutError(f"{where} ({role}) has no text \"content\"")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise SamoutError(f"{where} (tool) has no \"tool_call_id\" (the id of the call it answers)")
        return {"role": role, "content": content, "tool_call_id": call_id}
    return {"role": role, "content": content}


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    # The environment transformers renders chat templates with (render_jinja_template).
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: Jinja's own escapes HTML characters (<, >, &, ')
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise SamoutError(f"the chat template is not valid Jinja: {err}") from None


def render_text(messages: Sequence[dict[str, Any]], template: str = DEFAULT_CHAT_TEMPLATE,
                add_generation_prompt: bool = False, tools: Sequence[dict] | None = None) -> str:
    """The conversation as the template's text (special tokens spelled out); `tools`: OpenAI
    function definitions the template shows the model (as Hugging Face passes them)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=EOT_TOKEN, eos_token=EOT_TOKEN,
                                         tools=list(tools) if tools else None)
    except TemplateError as err:
        raise SamoutError(f"chat template: {err}") from None


def special_token_texts(tokenizer) -> list[str]:
    """The tokenizer's special tokens: those it declares (`special_tokens`, e.g. the OpenASH
    vocabulary's), else its added special tokens, else samout's fixed ones it has."""
    declared = getattr(tokenizer, "special_tokens", None)
    if declared is None and hasattr(tokenizer, "get_added_tokens_decoder"):
        declared = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    if not declared:
        declared = SPECIAL_TOKENS + CHAT_TOKENS
    return [t for t in declared if tokenizer.token_to_id(t) is not None]


def _special_pattern(tokenizer) -> re.Pattern:
    specials = sorted(special_token_texts(tokenizer), key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of rendered template text: special tokens where their text appears, the rest
    encoded as plain text piece by piece (what a Hugging Face tokenizer does)."""
    pieces = _special_pattern(tokenizer).split(text)
    encoded = iter(encode_texts(tokenizer, [p for p in pieces[::2] if p]))  # in one call: see encode_texts
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            ids.append(tokenizer.token_to_id(piece))
        elif piece:
            ids.extend(next(encoded))
    return ids


def render_ids(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               template: str = DEFAULT_CHAT_TEMPLATE, tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of a conversation (== Hugging Face
    `apply_chat_template(messages, tools=tools)["input_ids"]`)."""
    if template == DEFAULT_CHAT_TEMPLATE:  # its role markers must be special tokens of the tokenizer
        check_chat_tokenizer(tokenizer)
    return encode_rendered(tokenizer, render_text(check_messages(list(messages)), template,
                                                  add_generation_prompt, check_tools(tools)))


def assistant_mask(tokenizer, ids: Sequence[int]) -> list[int]:
    """1 on the tokens of assistant turns (after `<|assistant|>`, up to and including its
    `<|end|>`), 0 elsewhere: the tokens SFT trains on. Exact because content cannot spell a
    marker."""
    start, end = tokenizer.token_to_id(ASSISTANT_TOKEN), tokenizer.token_to_id(END_OF_TURN_TOKEN)
    mask, inside = [], False
    for token in ids:
        mask.append(1 if inside else 0)
        if token == start:
            inside = True
        elif token == end:
            inside = False
    return mask


def last_turn_mask(tokenizer, ids: Sequence[int]) -> list[int]:
    """1 on the last assistant turn only (a DPO completion), 0 elsewhere."""
    start = tokenizer.token_to_id(ASSISTANT_TOKEN)
    last = max(i for i, t in enumerate(ids) if t == start)
    return [0] * (last + 1) + [1] * (len(ids) - last - 1)


def end_of_turn_ids(tokenizer, template: str = DEFAULT_CHAT_TEMPLATE) -> list[int]:
    """The ids the template writes after an assistant's reply (`<|end|>` for samout's template,
    `<|im_end|>` for the author's OpenASH one): generation stops at the first of them, and a
    chat feeds them all to close the turn as the template does."""
    marker = "samout-reply-marker"
    text = render_text([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], template)
    if marker not in text:
        raise SamoutError("the chat template does not write the assistant's content")
    ids = encode_rendered(tokenizer, text[text.index(marker) + len(marker):])
    specials = {tokenizer.token_to_id(t) for t in special_token_texts(tokenizer)}
    if not ids or ids[0] not in specials:
        raise SamoutError("the chat template does not end an assistant turn with a special token")
    return ids


def turn_text(history: Sequence[dict[str, str]], message: dict[str, str], template: str) -> str:
    """The text a new message adds to a rendered `history` (with the generation prompt): the
    whole conversation's text when the history is empty. A chat that keeps its history as a
    state feeds only this, so the template must render a conversation turn by turn."""
    full = render_text([*history, message], template, add_generation_prompt=True)
    if not history:
        return full
    before = render_text(history, template)
    if not full.startswith(before):
        raise SamoutError("this chat template does not render a conversation as the concatenation of its "
                          "turns: a chat that keeps its history as a state cannot use it")
    return full[len(before):]


def check_chat_tokenizer(tokenizer) -> None:
    if not has_chat_tokens(tokenizer):
        raise SamoutError(
            f"the tokenizer has no chat tokens ({', '.join(CHAT_TOKENS)}): prepare chat data with "
            "`samout prepare --format chat`, which adds them"
        )


def load_chat_template(directory: str | Path) -> str:
    """The chat template of a run, model or data directory (its tokenizer_config.json), or the
    default when the directory has none (e.g. a checkpoints/step-XXXXXX directory). A
    directory written before the templates rendered tools gets the current template (the same
    text for conversations without tools)."""
    template = read_tokenizer_config(directory).get("chat_template")
    if template is None:
        return DEFAULT_CHAT_TEMPLATE
    if not isinstance(template, str):
        raise SamoutError(f"{Path(directory) / TOKENIZER_CONFIG_NAME}: chat_template must be a "
                          "Jinja string (named templates are not supported)")
    return _UPGRADES.get(template, template)
