"""Tool calls in conversations: the OpenAI shapes (`tools`, `tool_choice`, an assistant's
`tool_calls`, the `tool` role) checked with one-line errors naming the field, and the text
format a model writes a call in, parsed back into OpenAI's `tool_calls`.

The format (Hermes/Qwen style), the same in samout's template and the OpenASH one:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one per call, calls separated by a newline, after the reply's text (and a newline) if it has
any. The JSON is laid out as `json.dumps` does (", " and ": "). In samout's template the
markers are plain text (a byte-level BPE spells any text, so no new special tokens and no
embedding rows); the OpenASH vocabulary has `<tool_call>` and `</tool_call>` as special
tokens, which its template and grammars use. A tool's result is a `tool` message; the
templates render it as a user turn `<tool_response>RESULT</tool_response>`, results in the
order of the calls (the model never sees call ids, as in the Hermes/Qwen templates).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from samout.errors import SamoutError

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
RESPONSE_START, RESPONSE_END = "<tool_response>", "</tool_response>"
CALL_SEPARATOR = "\n"
TOOL_CHOICES = ("none", "auto", "required")
_TOOL_SHAPE = '{"type": "function", "function": {"name", ...}}'
_CHOICE_SHAPE = '{"type": "function", "function": {"name": ...}}'
_CALL_SHAPE = '{"type": "function", "function": {"name", "arguments"}}'
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WHITESPACE = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it (arguments: a dict, or a JSON string)."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return (CALL_START + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
            + json.dumps(arguments, ensure_ascii=False) + "}" + CALL_END)


def check_tools(tools: Any, field: str = "tools") -> list[dict]:
    """OpenAI's `tools` checked ([] for None): each {"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}; names unique; parameters a JSON schema object
    the grammar engine accepts."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise SamoutError(f"{field} must be a list of {_TOOL_SHAPE} objects")
    names = set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise SamoutError(f"{where} must be {_TOOL_SHAPE}")
        unknown = sorted(set(tool) - {"type", "function"})
        if unknown:
            raise SamoutError(f"{where}: unknown field {unknown[0]!r}")
        function = tool["function"]
        unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise SamoutError(f"{where}.function: unknown field {unknown[0]!r} "
                              "(use name, description, parameters, strict)")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SamoutError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        if name in names:
            raise SamoutError(f"{where}.function.name: {name!r} is defined twice")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise SamoutError(f"{where}.function.description must be a string")
        if "strict" in function and not isinstance(function["strict"], (bool, type(None))):
            raise SamoutError(f"{where}.function.strict must be true, false or null")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise SamoutError(f"{where}.function.parameters must be a JSON schema object")
        _check_schema(parameters, bool(function.get("strict")), f"{where}.function.parameters")
    return tools


def _check_schema(schema: dict, strict: bool, where: str) -> None:
    try:
        import llguidance
    except ModuleNotFoundError:
        return  # checked when a grammar is built (which then asks for llguidance)
    from samout.decoding.grammar import JSON_LAYOUT, one_line

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={**JSON_LAYOUT, "lenient": not strict})
    except (ValueError, TypeError) as err:
        raise SamoutError(f"{where}: {one_line(err)}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise SamoutError(f"{where}: {one_line(error)}")


def tool_parameters(tool: dict) -> dict:
    """A checked tool's parameters schema (an object schema when it declares none)."""
    return tool["function"].get("parameters", {"type": "object"})


def check_tool_choice(tool_choice: Any, tools: list[dict], field: str = "tool_choice") -> str | dict:
    """OpenAI's `tool_choice` checked against the (checked) tools: "none", "auto",
    "required" or {"type": "function", "function": {"name": NAME}}. The default (None) is
    "auto" when there are tools, "none" otherwise."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise SamoutError(f"{field} must be one of {', '.join(TOOL_CHOICES)} or {_CHOICE_SHAPE}, "
                              f"got {tool_choice!r}")
        if tool_choice != "none" and not tools:
            raise SamoutError(f"{field} {tool_choice!r} needs tools")
        return tool_choice
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" \
            or not isinstance(tool_choice.get("function"), dict) or set(tool_choice) - {"type", "function"}:
        raise SamoutError(f"{field} must be one of {', '.join(TOOL_CHOICES)} or {_CHOICE_SHAPE}")
    name = tool_choice["function"].get("name")
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise SamoutError(f"{field}.function.name {name!r} is not one of the tools"
                          + (f" ({', '.join(known)})" if known else ""))
    return tool_choice


def prompt_tools(tools: Any, tool_choice: Any) -> list[dict]:
    """The tools a prompt shows the model, both fields checked: none for `tool_choice` "none"
    (the model is not told about tools, and its reply is not parsed for calls)."""
    tools = check_tools(tools)
    return [] if check_tool_choice(tool_choice, tools) == "none" else tools


def check_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's `tool_calls` checked: [{"id"?, "type": "function", "function":
    {"name", "arguments": a JSON object, or a string holding one}}]."""
    if not isinstance(calls, list) or not calls:
        raise SamoutError(f"{where} must be a non-empty list of tool calls")
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise SamoutError(f"{at} must be {_CALL_SHAPE}")
        if call.get("type", "function") != "function":
            raise SamoutError(f"{at}.type must be \"function\", got {call.get('type')!r}")
        if "id" in call and not isinstance(call["id"], str):
            raise SamoutError(f"{at}.id must be a string")
        name, arguments = call["function"].get("name"), call["function"].get("arguments")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SamoutError(f"{at}.function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise SamoutError(f"{at}.function.arguments is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise SamoutError(f"{at}.function.arguments must be a JSON object (or a string holding one)")
    return calls


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, make_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[dict]]:
    """A reply's text -> (content, tool_calls) in OpenAI's shapes: each well-formed
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (whitespace allowed around the
    JSON, whose strings may hold anything, `</tool_call>` included) becomes
    {"id", "type": "function", "function": {"name", "arguments": JSON string}} and leaves the
    content; a malformed or unfinished one stays in the content as text. content is None
    when nothing but calls (and whitespace) was written."""
    calls: list[dict] = []
    kept: list[str] = []
    last = pos = 0
    while (start := text.find(CALL_START, pos)) >= 0:
        pos = start + len(CALL_START)
        body = _WHITESPACE.match(text, pos).end()
        try:
            value, end = _DECODER.raw_decode(text, body)
        except json.JSONDecodeError:
            continue
        end = _WHITESPACE.match(text, end).end()
        call = _parse_call(value)
        if call is None or not text.startswith(CALL_END, end):
            continue
        kept.append(text[last:start])
        last = pos = end + len(CALL_END)
        calls.append({"id": make_id(), "type": "function",
                      "function": {"name": call[0], "arguments": json.dumps(call[1], ensure_ascii=False)}})
    kept.append(text[last:])
    content = "".join(kept)
    if calls:
        content = content.strip()
        return (content or None), calls
    return content, calls


def _parse_call(value: Any) -> tuple[str, dict] | None:
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    name, arguments = value["name"], value["arguments"]
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return name, arguments
