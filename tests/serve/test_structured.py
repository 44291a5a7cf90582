"""Structured output through `samout serve`: every sampled reply to a `json_schema` response
format parses and validates, `json_object` gives objects, the official client's
`chat.completions.parse` gets a pydantic object back, and a stream carries the same JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from samout.serve.api_server import ServerSettings
from samout.serve.loading import served_model
from tests.serve.serve_fixtures import running_server, serve_pair

SCHEMAS = {
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": False},
        "active": {"type": "boolean"}},
        "required": ["user", "active"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
        "required": ["tags", "flags"], "additionalProperties": False},
    "scalars": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["x", "ok", "note"], "additionalProperties": False},
}
N = 8  # the most choices a request may ask for (protocol.MAX_N)
MESSAGES = [{"role": "user", "content": "Describe a thing as JSON."}]


@pytest.fixture(scope="module")
def server(serve_models):
    model, transformer, tokenizer = serve_models[:3]
    models = serve_pair(model, transformer, tokenizer)
    models.append(served_model(model, tokenizer, "plain", chat_template=None, state_cache_mb=0))
    with running_server(models, ServerSettings()) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"), "schema": SCHEMAS[name],
                                                   "strict": True}}


def chat(server: str, **body) -> dict:
    r = httpx.post(server + "/v1/chat/completions", json={"model": "samout", "messages": MESSAGES, **body},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_hundred_sampled_replies_validate(server):
    """128 replies: 4 schemas x 4 requests x n=8 (the most a request may ask), sent together."""
    jobs = [(name, seed) for name in SCHEMAS for seed in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: chat(server, response_format=response_format(job[0]), n=N,
                                                 temperature=1.0, seed=job[1] * N, max_tokens=300), jobs))
    values = set()
    for (name, _), answer in zip(jobs, answers):
        assert len(answer["choices"]) == N
        for choice in answer["choices"]:
            assert choice["finish_reason"] == "stop", choice
            value = json.loads(choice["message"]["content"])
            jsonschema.validate(value, SCHEMAS[name])
            values.add(json.dumps(value, sort_keys=True))
    assert len(values) >= 20  # sampled, not forced into one output


def test_json_object_replies_are_objects(server):
    answer = chat(server, response_format={"type": "json_object"}, n=8, temperature=1.0, seed=1,
                  max_tokens=300)
    for choice in answer["choices"]:
        if choice["finish_reason"] == "stop":  # an object with no bounds may run past max_tokens
            assert isinstance(json.loads(choice["message"]["content"]), dict)
    assert sum(c["finish_reason"] == "stop" for c in answer["choices"]) >= 4


def test_completions_take_a_response_format_too(server):
    r = httpx.post(server + "/v1/completions", json={
        "model": "transformer", "prompt": "A colour:", "max_tokens": 50, "n": 4, "temperature": 1.0,
        "response_format": response_format("enums")}, timeout=60)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS["enums"])


def test_a_model_without_chat_is_told_so_before_the_schema_compiles(server):
    r = httpx.post(server + "/v1/chat/completions", json={"model": "plain", "messages": MESSAGES,
                                                          "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


def test_a_cut_reply_ends_with_length(server):
    answer = chat(server, response_format=response_format("nested"), max_tokens=3, temperature=1.0, seed=0)
    assert answer["choices"][0]["finish_reason"] == "length"


def test_min_tokens_does_not_outlast_the_grammar(server):
    """The grammar's end wins over min_tokens (which would otherwise mask the end token)."""
    answer = chat(server, response_format=response_format("enums"), min_tokens=200, max_tokens=250,
                  temperature=1.0, seed=3)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS["enums"])


def test_a_stream_carries_the_same_json(server, client):
    for name in ("nested", "arrays"):
        kwargs = dict(model="samout", messages=MESSAGES, response_format=response_format(name), n=3,
                      temperature=1.0, seed=11, max_tokens=300)
        whole = client.chat.completions.create(**kwargs)
        texts = [""] * 3
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        assert texts == [c.message.content for c in whole.choices]
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMAS[name])


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    zip: str | None = pydantic.Field(max_length=5)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    role: Literal["admin", "user"]
    home: Address
    tags: list[Literal["a", "b"]] = pydantic.Field(max_length=3)
    age: int | None = pydantic.Field(ge=0, le=150)


def test_openai_client_parse_returns_a_pydantic_object(client):
    """What the client sends for `parse`: strict json_schema with $defs, anyOf for Optional and
    additionalProperties false; it must compile, and the reply must parse back."""
    for seed in range(3):
        completion = client.chat.completions.parse(model="samout", messages=MESSAGES, response_format=Person,
                                                   temperature=1.0, seed=seed, max_tokens=300)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Person)
        assert message.parsed == Person.model_validate_json(message.content)
