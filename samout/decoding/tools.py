"""Grammars for OpenAI's `tool_choice`: what the model may write when it must call tools.

- "required": one or more calls (one when `parallel_tool_calls` is false) to any of the tools,
- {"type": "function", "function": {"name": NAME}}: exactly one call to NAME,
- "auto": no constraint (generate freely, then `samout.chat.tools.parse_tool_calls`),
- "none": no constraint, and the tools are neither shown to the model nor parsed.

A call is written as `samout.chat.tools` lays it out, `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>`, calls separated by a newline; each call's arguments are held to its
function's `parameters` schema (llguidance's Lark grammars with embedded JSON schemas,
`%json{...}`). Where the tokenizer has `<tool_call>` and `</tool_call>` as special tokens (the
OpenASH vocabulary) the grammar writes those tokens; otherwise the markers are plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from samout.chat.template import special_token_texts
from samout.chat.tools import (
    CALL_END,
    CALL_SEPARATOR,
    CALL_START,
    check_tool_choice,
    check_tools,
    tool_parameters,
)
from samout.decoding.grammar import JSON_LAYOUT, GrammarConstraint, _llguidance, grammar_constraint
from samout.errors import SamoutError


def _marker(tokenizer, text: str) -> str:
    """A Lark terminal for a marker: its special token where the tokenizer has one, else text."""
    if text in special_token_texts(tokenizer):
        return f"<[{tokenizer.token_to_id(text)}]>"
    return json.dumps(text)


def call_marker_ids(tokenizer) -> frozenset[int]:
    """The ids of the call markers that are special tokens of the tokenizer (OpenASH's
    `<tool_call>` and `</tool_call>`; none for samout's, whose markers are text): a reply parsed
    for calls keeps their text (`TextStream(keep=...)`), where other special tokens are dropped."""
    specials = set(special_token_texts(tokenizer))
    return frozenset(tokenizer.token_to_id(t) for t in (CALL_START, CALL_END) if t in specials)


def _call_schema(tool: dict) -> dict:
    """The JSON of one call to `tool`: {"name": NAME, "arguments": <its parameters>}."""
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": tool_parameters(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {**JSON_LAYOUT, "lenient": not function.get("strict")},
    }


def tool_call_grammar(tokenizer, tools: list[dict], names: list[str], parallel: bool) -> str:
    """The Lark grammar of calls to the tools named `names` (checked tools)."""
    by_name = {t["function"]["name"]: t for t in tools}
    rules = [f"f{i}: %json {json.dumps(_call_schema(by_name[name]))}" for i, name in enumerate(names)]
    more = f" ({json.dumps(CALL_SEPARATOR)} call)*" if parallel else ""
    return "\n".join([
        "%llguidance {}",
        f"start: call{more}",
        f"call: {_marker(tokenizer, CALL_START)} body {_marker(tokenizer, CALL_END)}",
        "body: " + " | ".join(f"f{i}" for i in range(len(names))),
        *rules,
    ]) + "\n"


def tool_call_constraint(tokenizer, tools: Any, tool_choice: Any, *, parallel_tool_calls: bool = True,
                         eos_ids: Iterable[int] | None = None) -> GrammarConstraint | None:
    """The constraint `tool_choice` puts on a reply (None for "auto" and "none"); `tools` and
    `tool_choice` are checked first (one-line SamoutErrors naming the field), and the
    grammar is compiled now, before any token. eos_ids: the chat's end-of-turn ids."""
    if not isinstance(parallel_tool_calls, bool):
        raise SamoutError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    tools = check_tools(tools)
    choice = check_tool_choice(tool_choice, tools)
    if choice in ("auto", "none"):
        return None
    names = [t["function"]["name"] for t in tools] if choice == "required" else [choice["function"]["name"]]
    parallel = parallel_tool_calls and choice == "required"
    lark = tool_call_grammar(tokenizer, tools, names, parallel)
    return grammar_constraint(tokenizer, _llguidance().LLMatcher.grammar_from_lark(lark), "tools", eos_ids)
