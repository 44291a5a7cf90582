"""Tool calls through `samout serve` with the official `openai` client: a forced call comes back
in OpenAI's shape with arguments valid against the function's parameters, its result goes
back as a `tool` message and the conversation renders; a stream gives the same calls and
content as the whole response; a free reply's calls are parsed, streamed or not, alike."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from samout.chat.tools import call_text
from samout.decoding.params import SamplingParams
from samout.openash_tokenizer import SPECIAL_TOKENS, OpenAshVocab
from samout.serve import protocol as P
from samout.serve.api_server import ServerSettings
from samout.serve.engine import GenerationRequest
from samout.serve.serving_chat import ChatRun, reply_parts
from tests.serve.serve_fixtures import running_server, serve_pair

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(serve_models):
    model, transformer, tokenizer = serve_models[:3]
    with running_server(serve_pair(model, transformer, tokenizer), ServerSettings()) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def check_calls(calls, names=None):
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_round_trip_with_the_openai_client(client):
    first = client.chat.completions.create(model="samout", messages=MESSAGES, tools=TOOLS,
                                           tool_choice="required", temperature=1.0, seed=0, max_tokens=200)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    check_calls(choice.message.tool_calls)
    results = [{"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}
               for call in choice.message.tool_calls]
    messages = [*MESSAGES, choice.message.model_dump(exclude_none=True), *results]
    final = client.chat.completions.create(model="samout", messages=messages, tools=TOOLS, temperature=1.0,
                                           seed=0, max_tokens=20)
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the calls and results are in the prompt
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert isinstance(answer.message.content, str) or answer.message.tool_calls
    # The same conversation with tool_choice "none": the tools leave the prompt, the calls stay.
    plain = client.chat.completions.create(model="samout", messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=5)
    assert plain.choices[0].message.tool_calls is None
    assert plain.usage.prompt_tokens < final.usage.prompt_tokens


def test_a_named_function_is_called_once(client):
    for seed in range(4):
        answer = client.chat.completions.create(
            model="samout", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = answer.choices[0].message.tool_calls
        assert answer.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        check_calls(calls, {"get_time"})


def test_no_parallel_calls_means_one_call(client):
    answer = client.chat.completions.create(model="samout", messages=MESSAGES, tools=TOOLS, n=8,
                                            tool_choice="required", parallel_tool_calls=False,
                                            temperature=1.0, seed=5, max_tokens=200)
    for choice in answer.choices:
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_streamed_calls_equal_the_whole_response(client, server):
    kwargs = dict(model="samout", messages=MESSAGES, tools=TOOLS, tool_choice="required", n=4,
                  temperature=1.0, seed=3, max_tokens=200)
    whole = client.chat.completions.create(**kwargs)
    calls: dict[int, list] = {}
    finish = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(choice.index, []).append(delta)
                assert delta.id.startswith("call_") and delta.type == "function"
                assert delta.index == len(calls[choice.index]) - 1
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert finish[choice.index] == choice.finish_reason == "tool_calls"
        assert [(d.function.name, d.function.arguments) for d in calls[choice.index]] == \
            [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    # The client's streaming helper accumulates the deltas into the same message.
    with client.chat.completions.stream(**{**kwargs, "n": 1}) as stream:
        final = stream.get_final_completion()
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in single.choices[0].message.tool_calls]


def test_bad_tool_messages_are_400s(server):
    bad = [*MESSAGES, {"role": "tool", "content": "21"}]  # no tool_call_id
    r = httpx.post(server + "/v1/chat/completions", json={"model": "samout", "messages": bad, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "tool_call_id" in r.json()["error"]["message"]


TEXTS = [
    "plain text, no calls",
    "  leading space and trailing \n",
    "Let me check.\n" + call_text("get_time", {"zone": "UTC"}),
    call_text("get_weather", {"city": "Paris", "unit": "celsius"}) + "\n"
    + call_text("get_time", {"zone": "CET"}),
    "a <tool_call> that is not one, then " + call_text("get_time", {"zone": "UTC"}) + " and after",
    "an unfinished <tool_call>{\"name\": \"get_time\", \"argu",
    "a < b and <tool_ stays text",
    " \n" + call_text("get_time", {"zone": "UTC"}) + "  ",
]


@pytest.mark.parametrize("stop", [None, ["</tool_call>"], ["then"], ["text, no"], ["zzz"]])
@pytest.mark.parametrize("text", TEXTS)
def test_a_free_reply_streams_as_it_parses(serve_models, text, stop):
    """tool_choice "auto": the stream's content and calls equal the whole reply's, token by
    token, with stop strings too (text held back for a possible stop is never sent early)."""
    tokenizer = serve_models[2]
    served = serve_pair(serve_models[0], serve_models[1], tokenizer)[0]
    body = P.ChatCompletionRequest(model="samout", messages=MESSAGES, tools=TOOLS, stream=True, stop=stop)
    request = GenerationRequest(np.array([1], dtype=np.int32), SamplingParams(), lambda e: None)
    run = ChatRun(body, served, [request], None, tools=True)
    sent = ""
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        if run.finish[0] is None:
            sent += run._apply(0, ("token", token))
    if run.finish[0] is None:
        sent += run._apply(0, ("finish", "stop", {}))
    reply = run.streams[0].text  # the whole reply, as a response without streaming has it
    assert reply == (text if stop is None else text.split(stop[0])[0])
    content, calls = reply_parts(reply)
    assert sent == (content or "")
    assert [c["function"] for c in run.calls[0]] == [c["function"] for c in calls]
    chunks = run._chunk(0, "", "stop")
    reason = "tool_calls" if calls else "stop"
    assert chunks.count("data: ") == (len(calls) + 1 if calls else 1)
    assert f'"finish_reason": "{reason}"' in chunks


# -- OpenASH: the call markers are special tokens ----------------------------------------

def openash_vocab() -> OpenAshVocab:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = SPECIAL_TOKENS + [c for c in chars if c not in SPECIAL_TOKENS] + ["ts0", "te0"]
    return OpenAshVocab({"token_to_id": {t: i for i, t in enumerate(tokens)},
                         "id_to_token": {str(i): t for i, t in enumerate(tokens)},
                         "agent_token_to_token_id": {}, "agent_token_id_to_token": {}})


def openash_ids(vocab: OpenAshVocab, text: str) -> list[int]:
    """The ids of `text`, its special tokens as their tokens and the rest character by character
    (a word-level vocabulary with every ASCII character; no jieba needed)."""
    pattern = "(" + "|".join(re.escape(t) for t in vocab.special_tokens) + ")"
    return [i for piece in re.split(pattern, text) if piece
            for i in ([vocab.token_to_id(piece)] if piece in vocab.special_tokens
                      else [vocab.token_to_id(ch) for ch in piece])]


OPENASH_REPLY = ("Let me <|think|>check.\n" + call_text("get_weather", {"city": "Paris", "unit": "celsius"})
                 + "\n" + call_text("get_time", {"zone": "UTC"}))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openash_marker_tokens_are_parsed_into_calls(stream):
    """The OpenASH vocabulary's `<tool_call>`/`</tool_call>` are special tokens: a reply holding
    them is parsed into OpenAI's tool_calls, the same streamed or not; other special tokens are
    still dropped from the content."""
    vocab = openash_vocab()
    ids = openash_ids(vocab, OPENASH_REPLY)
    assert vocab.token_to_id("<tool_call>") in ids and vocab.token_to_id("</tool_call>") in ids
    served = SimpleNamespace(tokenizer=vocab, name="openash")
    body = P.ChatCompletionRequest(model="openash", messages=MESSAGES, tools=TOOLS, stream=stream)
    request = GenerationRequest(np.array([1], dtype=np.int32), SamplingParams(), lambda e: None)
    run = ChatRun(body, served, [request], None, tools=True)
    sent = "".join(run._apply(0, ("token", token)) for token in ids)
    sent += run._apply(0, ("finish", "stop", {}))
    want = [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            {"name": "get_time", "arguments": '{"zone": "UTC"}'}]
    if stream:
        assert sent == "Let me check."
        assert [c["function"] for c in run.calls[0]] == want
        chunks = [json.loads(line[6:]) for line in run._chunk(0, "", "stop").split("\n\n") if line]
        deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1]]
        assert [(d["index"], d["type"], d["function"]) for d in deltas] == [(0, "function", want[0]),
                                                                           (1, "function", want[1])]
        assert all(d["id"].startswith("call_") for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        choices = [{"index": 0, "text": run.streams[0].text, "finish_reason": run.finish[0],
                    "logprobs": None}]
        choice = run._response(choices, P.usage_dict(1, len(ids), 0))["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me check."
        calls = choice["message"]["tool_calls"]
        assert [(c["type"], c["function"]) for c in calls] == [("function", w) for w in want]
        assert all(c["id"].startswith("call_") for c in calls)


def test_openash_special_tokens_stay_hidden_without_tools():
    """Without tools the markers are special tokens like any other: dropped from the text."""
    vocab = openash_vocab()
    served = SimpleNamespace(tokenizer=vocab, name="openash")
    body = P.ChatCompletionRequest(model="openash", messages=MESSAGES, tools=TOOLS, tool_choice="none")
    request = GenerationRequest(np.array([1], dtype=np.int32), SamplingParams(), lambda e: None)
    run = ChatRun(body, served, [request], None, tools=False)
    for token in openash_ids(vocab, OPENASH_REPLY):
        run._apply(0, ("token", token))
    run._apply(0, ("finish", "stop", {}))
    assert "<" not in run.streams[0].text and run.streams[0].text.startswith("Let me check.\n{")
