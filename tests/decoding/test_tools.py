"""tool_choice grammars: sampled replies parse into calls whose arguments validate against
the function's parameters; OpenASH's special-token markers; the word-level vocabulary."""

from __future__ import annotations

import json

import jsonschema
import pytest

from samout.chat.tools import parse_tool_calls
from samout.decoding.detokenizer import TextStream
from samout.decoding.grammar import json_schema_constraint
from samout.decoding.tools import call_marker_ids, tool_call_constraint, tool_call_grammar
from samout.errors import SamoutError
from samout.openash_tokenizer import SPECIAL_TOKENS, OpenAshVocab
from tests.chat.chat_fixtures import chat_tokenizer
from tests.decoding.sampling import sample_constrained

PARAMS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"], "additionalProperties": False},
    "add": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -100, "maximum": 100}, "b": {"type": "number"},
        "exact": {"type": "boolean"}}, "required": ["a", "b"], "additionalProperties": False},
    "tag": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                  "additionalProperties": False}},
        "required": ["tags", "owner"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": params}}
         for name, params in PARAMS.items()]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(300)


def sample_calls(tokenizer, constraint, n=100, seed=0, decode=None):
    constraints = [constraint] + [constraint.fresh() for _ in range(n - 1)]
    end = set(constraint.tokenizer.eos_ids)
    # random logits would add calls for long: make the end of the turn as likely as the next call
    outputs = sample_constrained(constraints, tokenizer.get_vocab_size(), max_tokens=400, seed=seed,
                                 bias=dict.fromkeys(end, 6.0))
    replies = []
    for tokens, c in zip(outputs, constraints):
        assert c.is_finished()
        body = tokens[:-1] if tokens[-1] in end else tokens  # a grammar that cannot go on stops without one
        assert not end & set(body)
        text = (decode or (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)))(body)
        content, calls = parse_tool_calls(text)
        assert content is None, text  # nothing but calls
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])
        replies.append(calls)
    return replies


def test_required_gives_calls_to_the_tools_with_valid_arguments(tokenizer):
    end = tokenizer.token_to_id("<|end|>")
    constraint = tool_call_constraint(tokenizer, TOOLS, "required", eos_ids=[end])
    replies = sample_calls(tokenizer, constraint)
    assert all(len(calls) >= 1 for calls in replies)
    assert max(len(calls) for calls in replies) > 1  # parallel calls happen
    assert {c["function"]["name"] for calls in replies for c in calls} == set(PARAMS)


def test_required_without_parallel_calls_gives_one_call(tokenizer):
    constraint = tool_call_constraint(tokenizer, TOOLS, "required", parallel_tool_calls=False, eos_ids=[5])
    replies = sample_calls(tokenizer, constraint, seed=1)
    assert all(len(calls) == 1 for calls in replies)


def test_named_function_gives_one_call_to_it(tokenizer):
    choice = {"type": "function", "function": {"name": "tag"}}
    constraint = tool_call_constraint(tokenizer, TOOLS, choice, eos_ids=[5])
    replies = sample_calls(tokenizer, constraint, seed=2)
    assert all(len(calls) == 1 and calls[0]["function"]["name"] == "tag" for calls in replies)


def test_auto_and_none_do_not_constrain(tokenizer):
    assert tool_call_constraint(tokenizer, TOOLS, "auto") is None
    assert tool_call_constraint(tokenizer, TOOLS, None) is None
    assert tool_call_constraint(tokenizer, TOOLS, "none") is None
    assert tool_call_constraint(tokenizer, None, None) is None


def test_bad_tools_or_choice_fail_before_generation(tokenizer):
    with pytest.raises(SamoutError, match=r"tools\[0\].function.parameters"):
        tool_call_constraint(tokenizer, [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "string", "pattern": "("}}}], "required")
    with pytest.raises(SamoutError, match="parallel_tool_calls must be true or false"):
        tool_call_constraint(tokenizer, TOOLS, "required", parallel_tool_calls="yes")
    with pytest.raises(SamoutError, match="tool_choice.function.name 'g'"):
        tool_call_constraint(tokenizer, TOOLS, {"type": "function", "function": {"name": "g"}})


def test_markers_are_text_for_samout_tokenizers(tokenizer):
    lark = tool_call_grammar(tokenizer, TOOLS, ["add"], parallel=False)
    assert 'call: "<tool_call>" body "</tool_call>"' in lark and "start: call\n" in lark


# -- the author's word-level vocabulary ------------------------------------------------

def openash_vocab() -> OpenAshVocab:
    chars = list('{}[]":,. -_0123456789') + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["C", "F"]
    words = ["get_weather", "city", "unit", "name", "arguments", "tags", "owner", "id", "true", "false"]
    tokens = SPECIAL_TOKENS + chars + words + ["ts0", "ts1", "te0", "te1"]
    agent = {"发展": "0t0", "语言": "0t1", "自": "1t0", "然": "1t1"}
    return OpenAshVocab({"token_to_id": {t: i for i, t in enumerate(tokens)},
                         "id_to_token": {str(i): t for i, t in enumerate(tokens)},
                         "agent_token_to_token_id": agent,
                         "agent_token_id_to_token": {v: k for k, v in agent.items()}})


def test_openash_vocabulary_json_and_tool_calls():
    vocab = openash_vocab()
    im_end = vocab.token_to_id("<|im_end|>")
    schema = PARAMS["get_weather"]
    constraint = json_schema_constraint(vocab, schema, eos_ids=[im_end])
    constraints = [constraint] + [constraint.fresh() for _ in range(49)]
    outputs = sample_constrained(constraints, vocab.get_vocab_size(), max_tokens=200, seed=3)
    for tokens, c in zip(outputs, constraints):
        assert c.is_finished()
        body = tokens[:-1] if tokens[-1] == im_end else tokens
        assert max(body) < vocab.ts0 and not set(body) & vocab.special_ids  # plain words and characters
        jsonschema.validate(json.loads(vocab.decode(body)), schema)

    tools = [t for t in TOOLS if t["function"]["name"] == "get_weather"]
    lark = tool_call_grammar(vocab, tools, ["get_weather"], parallel=True)
    start, end = vocab.token_to_id("<tool_call>"), vocab.token_to_id("</tool_call>")
    assert f"call: <[{start}]> body <[{end}]>" in lark  # the vocabulary's special tokens
    constraint = tool_call_constraint(vocab, tools, "required", eos_ids=[im_end])
    replies = sample_calls(vocab, constraint, n=50, seed=4, decode=vocab.decode)
    assert all(calls and all(c["function"]["name"] == "get_weather" for c in calls) for calls in replies)
    # the server's detokenizer (special tokens dropped, the call markers kept) reads the same calls
    assert call_marker_ids(vocab) == {start, end}
    replies = sample_calls(vocab, constraint.fresh(), n=50, seed=4,
                           decode=lambda ids: stream_text(vocab, ids))
    assert all(calls and all(c["function"]["name"] == "get_weather" for c in calls) for calls in replies)


def stream_text(tokenizer, ids) -> str:
    stream = TextStream(tokenizer, keep=call_marker_ids(tokenizer))
    text = "".join(stream.add(i) for i in ids) + stream.finish()
    assert text == stream.text
    return text


def test_marker_ids_are_kept_and_other_special_tokens_dropped():
    vocab = openash_vocab()
    tokens = ["c", "<|think|>", "<tool_call>", "{", "}", "</tool_call>", "<|im_start|>"]
    ids = [vocab.token_to_id(t) for t in tokens]
    assert stream_text(vocab, ids) == "c<tool_call>{}</tool_call>"
    assert "".join(TextStream(vocab).add(i) for i in ids) == "c{}"  # without keep: all dropped


def test_samout_markers_are_text_so_no_ids_are_kept(tokenizer):
    assert call_marker_ids(tokenizer) == frozenset()
