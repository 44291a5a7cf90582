"""Logprobs, echo (scoring calls) and the penalties through the HTTP API: the numbers are the
model's own log-softmax, streamed deltas carry them, and a seeded completion with penalties
equals `samout.generation` with the same settings."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from samout.generation import SamplingParams, stream_ids
from samout.serve.api_server import ServerSettings
from samout.serve.loading import served_model
from samout.serve.serving import token_text
from samout.tokenizer import EOT_ID
from tests.serve.serve_fixtures import running_server, serve_pair


@pytest.fixture(scope="module")
def server(serve_models):
    model, transformer, tokenizer = serve_models[:3]
    models = serve_pair(model, transformer, tokenizer, prefill_chunk=8)
    models.append(served_model(model, tokenizer, "cached", chat_template=None, prefill_chunk=8))
    with running_server(models, ServerSettings()) as url:
        yield url


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one call over the whole sequence."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].float(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def post(server, path, body):
    r = httpx.post(server + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", ["samout", "transformer", "cached"])
def test_echo_scores_a_token_id_prompt(serve_models, server, name):
    model = serve_models[1] if name == "transformer" else serve_models[0]
    ids = [EOT_ID] + list(range(40, 61))  # longer than prefill_chunk: scored across chunks
    for _ in range(2):  # the second time, a state cache must not skip the prompt's logits
        out = post(server, "/v1/completions", {"model": name, "prompt": ids, "max_tokens": 0, "echo": True,
                                              "logprobs": 2, "temperature": 0})
        choice = out["choices"][0]
        assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(full_logprobs(model, ids).tolist(), abs=1e-4)
        assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_echo_with_a_generated_token_is_what_lm_eval_asks(serve_models, server):
    model, _, tokenizer = serve_models[:3]
    ids = [EOT_ID] + tokenizer.encode("Hello there, how are").ids
    out = post(server, "/v1/completions", {"model": "samout", "prompt": [ids, ids[:4]], "max_tokens": 1,
                                          "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234})
    first = sorted(out["choices"], key=lambda c: c["index"])[0]
    lp = first["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's, then the generated token's
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(full_logprobs(model, ids).tolist(), abs=1e-4)
    greedy = [max(top.values()) for top in lp["top_logprobs"][1:]]
    assert lp["token_logprobs"][-1] == greedy[-1]  # greedy: the generated token is the top one
    assert first["text"].startswith(tokenizer.decode(ids, skip_special_tokens=True))


def test_generated_logprobs_and_stream_deltas(serve_models, server):
    model, _, tokenizer = serve_models[:3]
    body = {"model": "samout", "prompt": "Hello", "max_tokens": 10, "temperature": 0, "logprobs": 3,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", body)["choices"][0]
    ids = [EOT_ID] + tokenizer.encode("Hello").ids
    new = list(stream_ids(model, ids, SamplingParams(max_new_tokens=10, temperature=0, stop_at_eot=False)))
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == 10 and all(len(t) == 3 for t in lp["top_logprobs"])
    assert lp["token_logprobs"] == pytest.approx(full_logprobs(model, ids + new)[-10:].tolist(), abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        part = chunk["choices"][0]["logprobs"]
        for key in streamed:
            streamed[key] += part[key] if part else []
    assert streamed == lp
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_chat_logprobs_and_top_logprobs(server):
    body = {"model": "samout", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 4}
    out = post(server, "/v1/chat/completions", body)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) >= out["usage"]["completion_tokens"]  # (+ the stop token, when it stopped)
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and len(item["top_logprobs"]) == 4
        assert item["logprob"] == item["top_logprobs"][0]["logprob"]  # greedy
        assert isinstance(item["bytes"], list)
    url = server + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [item for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for item in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = post(server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


PENALISED = dict(temperature=0.9, top_k=40, min_p=0.02, repetition_penalty=1.35, repetition_window=64,
                 presence_penalty=0.5, frequency_penalty=0.3, min_tokens=3, seed=7)


@pytest.mark.parametrize("name", ["samout", "transformer"])
def test_seeded_penalised_completion_equals_generation(serve_models, server, name):
    model, transformer, tokenizer = serve_models[:3]
    model = transformer if name == "transformer" else model
    ids = [EOT_ID] + tokenizer.encode("Once upon").ids
    bias = {5: 3.0, 9: -100.0}
    want = list(stream_ids(model, ids, SamplingParams(max_new_tokens=20, logit_bias=bias, **PENALISED)))
    body = {"model": name, "prompt": ids, "max_tokens": 20, "logprobs": 0,
            "logit_bias": {str(k): v for k, v in bias.items()}, **PENALISED}
    jobs = [post(server, "/v1/completions", body) for _ in range(2)]
    for out in jobs:
        lp = out["choices"][0]["logprobs"]
        assert out["usage"]["completion_tokens"] == len(want)
        assert out["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
        assert lp["tokens"][:len(want)] == [token_text(tokenizer, t) for t in want]


def test_stop_token_ids_and_logit_bias(serve_models, server):
    tokenizer = serve_models[2]
    base = {"model": "samout", "prompt": [EOT_ID, 50, 60], "max_tokens": 5, "temperature": 0}
    forced = post(server, "/v1/completions", {**base, "logit_bias": {"65": 100}})["choices"][0]
    assert forced["text"] == tokenizer.decode([65] * 5)
    stopped = post(server, "/v1/completions", {**base, "logit_bias": {"65": 100}, "stop_token_ids": [65]})
    assert stopped["choices"][0]["text"] == "" and stopped["choices"][0]["finish_reason"] == "stop"
    held = post(server, "/v1/completions", {**base, "logit_bias": {"65": 100}, "stop_token_ids": [65],
                                            "min_tokens": 5})
    assert held["choices"][0]["finish_reason"] == "length" and held["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_equals_the_whole_answer(server, max_tokens):
    body = {"model": "samout", "prompt": "Hello there", "max_tokens": max_tokens, "echo": True, "logprobs": 1,
            "temperature": 0, "n": 2}
    whole = post(server, "/v1/completions", body)["choices"]
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for choice in whole:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert choice["text"].startswith("Hello there")
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert tokens == choice["logprobs"]["tokens"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
