"""Tool calls in the chat templates (samout's and OpenASH's), their parser, and the checks of
`tools`, `tool_choice` and an assistant's `tool_calls`."""

from __future__ import annotations

import json
import random

import pytest

from samout.chat.template import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_CHAT_TEMPLATE_BEFORE_TOOLS,
    check_messages,
    load_chat_template,
    render_ids,
    render_text,
)
from samout.chat.tools import (
    call_text,
    check_tool_calls,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    prompt_tools,
)
from samout.errors import SamoutError
from samout.openash_tokenizer import CHAT_TEMPLATE as OPENASH_TEMPLATE
from samout.openash_tokenizer import CHAT_TEMPLATE_BEFORE_TOOLS as OPENASH_TEMPLATE_BEFORE_TOOLS
from samout.tokenizer import load_tokenizer, update_tokenizer_config
from tests.chat.chat_fixtures import chat_tokenizer, make_chat_run

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21 C <|end|>"},
    {"role": "assistant", "content": "Paris 18 C, Rome 21 C.",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
]
TOOLS_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "The weather now", '
              '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
              '"required": ["city"]}}}')


def test_samout_template_renders_tools_calls_and_results():
    text = render_text(check_messages(CONVERSATION), tools=TOOLS, add_generation_prompt=True)
    assert text == (
        "<|endoftext|><|system|>You can call these functions. To call one, reply with "
        '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>, one per call.\n<tools>\n'
        + TOOLS_JSON + "\n</tools><|end|>"
        "<|user|>Weather in Paris and Rome?<|end|>"
        '<|assistant|><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call><|end|>'
        "<|user|><tool_response>18 C</tool_response><|end|>"
        "<|user|><tool_response>21 C <\u200b|end|></tool_response><|end|>"
        '<|assistant|>Paris 18 C, Rome 21 C.\n<tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Oslo"}}</tool_call><|end|><|assistant|>'
    )


def test_samout_template_without_tools_is_unchanged():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    want = "<|endoftext|><|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>"
    assert render_text(messages) == want
    assert render_text(messages, tools=[]) == want


def test_openash_template_renders_tools_calls_and_results():
    text = render_text(check_messages(CONVERSATION), OPENASH_TEMPLATE, tools=TOOLS,
                       add_generation_prompt=True)
    assert text == (
        "<|im_start|><|system|><|tools|>" + TOOLS_JSON + "\n<|end_tools|><|im_end|>"
        "<|im_start|><|user|>Weather in Paris and Rome?<|im_end|>"
        '<|im_start|><|agent|><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call>\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call><|im_end|>'
        "<|im_start|><|user|><tool_response>18 C</tool_response><|im_end|>"
        "<|im_start|><|user|><tool_response>21 C <|end|></tool_response><|im_end|>"
        '<|im_start|><|agent|>Paris 18 C, Rome 21 C.\n<tool_call>{"name": "get_weather", "arguments": '
        '{"city": "Oslo"}}</tool_call><|im_end|><|im_start|><|agent|>'
    )
    plain = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    want = "<|im_start|><|user|>U<|im_end|><|im_start|><|agent|>A<|im_end|>"
    assert render_text(plain, OPENASH_TEMPLATE) == want


def test_template_text_of_a_call_is_what_the_parser_reads():
    for template in (None, OPENASH_TEMPLATE):
        args = () if template is None else (template,)
        text = render_text(check_messages(CONVERSATION[:2]), *args)
        reply = text.split("<|assistant|>" if template is None else "<|agent|>")[1]
        reply = reply.split("<|end|>" if template is None else "<|im_end|>")[0]
        content, calls = parse_tool_calls(reply)
        assert content is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, OPENASH_TEMPLATE], ids=["samout", "openash"])
def test_tool_turns_render_turn_by_turn(template):
    """Each message adds text at the end: a chat that keeps its state can feed tool turns."""
    messages = check_messages(CONVERSATION)
    for n in range(1, len(messages)):
        before = render_text(messages[:n], template, tools=TOOLS)
        assert render_text(messages[:n + 1], template, tools=TOOLS).startswith(before)
        assert len(render_text(messages[:n + 1], template, tools=TOOLS)) > len(before)


def test_hugging_face_renders_tools_the_same(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    import samout.hf  # noqa: F401  (registers the Auto classes)

    make_chat_run(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    template = load_chat_template(tmp_path)
    for gen in (False, True):
        want = render_ids(ours, CONVERSATION, add_generation_prompt=gen, template=template, tools=TOOLS)
        got = hf.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=True, add_generation_prompt=gen)
        assert got["input_ids"] == want
    rng = random.Random(0)
    pieces = ["a", " ", "<|", "|>", "<|end|>", "<tool_call>", "</tool_call>", "é", "\n", '"', "{", "🙂"]

    def text():
        return "".join(rng.choices(pieces, k=rng.randint(0, 6)))

    for _ in range(30):
        messages = [{"role": "user", "content": text()}]
        for _turn in range(rng.randint(1, 3)):
            call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": text()}}}
            content = rng.choice([None, text()])
            messages.append({"role": "assistant", "content": content, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": "c", "content": text()})
        messages.append({"role": "assistant", "content": text()})
        tools = [{"type": "function", "function": {"name": "get_weather", "description": text()}}]
        want = render_ids(ours, messages, template=template, tools=tools)
        assert hf.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"] == want, messages


def test_parse_round_trip():
    rng = random.Random(0)
    for _ in range(50):
        content = rng.choice(["", "Let me check.", "a <tool_call> b", "x\ny"])
        wanted = [(rng.choice(["f", "get_weather", "a-b_1"]),
                   {"k": rng.choice([1, "é", None, [1, {"z": True}], "</tool_call>"])})
                  for _ in range(rng.randint(1, 3))]
        text = (content + "\n" if content else "") + "\n".join(call_text(n, a) for n, a in wanted)
        counter = iter(range(100))
        got_content, calls = parse_tool_calls(text, make_id=lambda c=counter: f"call_{next(c)}")
        assert got_content == (content or None)
        assert [c["id"] for c in calls] == [f"call_{i}" for i in range(len(wanted))]
        assert all(c["type"] == "function" for c in calls)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == wanted
        check_tool_calls(calls, "calls")  # what the parser gives is a valid assistant message's calls


@pytest.mark.parametrize("text", [
    "no calls here", "<tool_call>{\"name\": \"f\"}</tool_call>", "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "f", "arguments": {"a": 1}}',
    '<tool_call>{"name": "f", "arguments": "x"}</tool_call>',
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
])
def test_malformed_or_unfinished_calls_stay_text(text):
    assert parse_tool_calls(text) == (text, [])


def test_parse_keeps_text_around_calls_and_makes_ids():
    content, calls = parse_tool_calls('Sure.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone.')
    assert content == "Sure.\n\nDone."
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) > 10
    assert calls[0]["function"] == {"name": "f", "arguments": "{}"}


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools must be a list"),
    ([{"type": "code"}], r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], r"tools\[0\].function.name must be"),
    ([{"type": "function", "function": {"name": "f", "params": {}}}],
     r"tools\[0\].function: unknown field 'params'"),
    ([WEATHER, WEATHER], r"tools\[1\].function.name: 'get_weather' is defined twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}],
     r"tools\[0\].function.parameters must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
     r"tools\[0\].function.parameters: .*objekt"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], r"tools\[0\].function.description"),
])
def test_bad_tools_are_one_line_errors(tools, message):
    with pytest.raises(SamoutError, match=message) as err:
        check_tools(tools)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("choice, tools, message", [
    ("always", TOOLS, "tool_choice must be one of none, auto, required"),
    ("required", [], "tool_choice 'required' needs tools"),
    ({"type": "function", "function": {"name": "nope"}}, TOOLS,
     r"tool_choice.function.name 'nope' is not one"),
    ({"type": "function", "name": "get_weather"}, TOOLS, "tool_choice must be one of"),
])
def test_bad_tool_choice_is_a_one_line_error(choice, tools, message):
    with pytest.raises(SamoutError, match=message):
        check_tool_choice(choice, tools)


def test_tool_choice_defaults():
    assert check_tool_choice(None, TOOLS) == "auto"
    assert check_tool_choice(None, []) == "none"
    assert check_tool_choice("none", []) == "none"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert check_tool_choice(named, TOOLS) == named


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "tool_calls": []}, "tool_calls must be a non-empty list"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
     r"tool_calls\[0\].function.arguments is not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     r"tool_calls\[0\].function.arguments must be a JSON object"),
    ({"role": "assistant", "tool_calls": [{"type": "x", "function": {"name": "f", "arguments": {}}}]},
     r"tool_calls\[0\].type must be"),
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
     "only assistant messages make tool calls"),
    ({"role": "tool", "content": "x", "tool_call_id": 3}, "no \"tool_call_id\""),
    ({"role": "tool", "tool_call_id": "c"}, "no text"),
])
def test_bad_tool_messages_are_one_line_errors(message, error):
    with pytest.raises(SamoutError, match=error):
        check_messages([message])


def test_render_ids_checks_tools():
    with pytest.raises(SamoutError, match=r"tools\[0\]"):
        render_ids(chat_tokenizer(), CONVERSATION[:1], tools=[{"type": "function"}])


@pytest.mark.parametrize("old, new", [(DEFAULT_CHAT_TEMPLATE_BEFORE_TOOLS, DEFAULT_CHAT_TEMPLATE),
                                      (OPENASH_TEMPLATE_BEFORE_TOOLS, OPENASH_TEMPLATE)])
def test_directories_with_the_template_before_tools_get_the_current_one(tmp_path, old, new):
    update_tokenizer_config(tmp_path, chat_template=old)
    assert load_chat_template(tmp_path) == new
    rng = random.Random(0)
    for _ in range(20):  # the same text for every conversation without tools
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choices(["a", "<|", "|>", " ", "é", "\n"], k=rng.randint(0, 6)))}
                    for _ in range(rng.randint(1, 5))]
        for gen in (False, True):
            assert render_text(messages, new, gen) == render_text(messages, old, gen)


def test_prompt_tools_leaves_tools_out_for_none():
    assert prompt_tools(TOOLS, "none") == []
    assert prompt_tools(TOOLS, None) == TOOLS
    assert prompt_tools(TOOLS, "required") == TOOLS
    assert prompt_tools(None, None) == []
    with pytest.raises(SamoutError, match="tool_choice 'auto' needs tools"):
        prompt_tools([], "auto")
