"""The HTTP API against samout.generation, through the official `openai` client, httpx and curl;
errors are OpenAI error objects with 400/401/404/429, never a 500."""

from __future__ import annotations

import json
import subprocess
import threading

import httpx
import openai
import pytest

from samout.chat.template import render_ids
from samout.generation import SamplingParams, generate, stream_ids
from samout.serve.api_server import ServerSettings
from samout.serve.loading import served_model
from samout.tokenizer import END_OF_TURN_TOKEN
from tests.serve.serve_fixtures import running_server, serve_pair

MAX_PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def server(serve_models):
    model, transformer, tokenizer = serve_models[:3]
    models = serve_pair(model, transformer, tokenizer, prefill_chunk=8)
    models.append(served_model(model, tokenizer, "plain", chat_template=None, state_cache_mb=0))
    with running_server(models, ServerSettings(max_prompt_tokens=MAX_PROMPT_TOKENS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def chat_reference(model, tokenizer, messages, max_tokens) -> str:
    """What the chat endpoint must answer greedily: generation up to <|end|> or end of text."""
    end = tokenizer.token_to_id(END_OF_TURN_TOKEN)
    ids = render_ids(tokenizer, messages, add_generation_prompt=True)
    out = []
    for token in stream_ids(model, ids, SamplingParams(max_new_tokens=max_tokens, temperature=0)):
        if token == end:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["samout", "transformer"])
def test_openai_client_completions_match_generate(serve_models, client, name):
    model = serve_models[0] if name == "samout" else serve_models[1]
    tokenizer = serve_models[2]
    want = generate(model, tokenizer, "Hello there", max_new_tokens=12, temperature=0)
    answer = client.completions.create(model=name, prompt="Hello there", max_tokens=12, temperature=0)
    assert answer.choices[0].text == want
    assert answer.usage.completion_tokens == 12 or answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == len(tokenizer.encode("Hello there").ids) + 1
    stream = client.completions.create(model=name, prompt="Hello there", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


@pytest.mark.parametrize("name", ["samout", "transformer"])
def test_openai_client_chat_matches_generation(serve_models, client, name):
    model = serve_models[0] if name == "samout" else serve_models[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    want = chat_reference(model, serve_models[2], messages, 10)
    answer = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == want and answer.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_curl_plain_and_stream(serve_models, server):
    model, _, tokenizer = serve_models[:3]
    want = generate(model, tokenizer, "The quick", max_new_tokens=6, temperature=0)
    body = {"model": "samout", "prompt": "The quick", "max_tokens": 6, "temperature": 0}
    plain = subprocess.run(["curl", "-sS", "--max-time", "60", server + "/v1/completions",
                            "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                           capture_output=True, text=True, check=True)
    assert json.loads(plain.stdout)["choices"][0]["text"] == want
    streamed = subprocess.run(["curl", "-sSN", "--max-time", "60", server + "/v1/completions",
                               "-H", "Content-Type: application/json",
                               "-d", json.dumps({**body, "stream": True})],
                              capture_output=True, text=True, check=True)
    events = [line[6:] for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want


def test_concurrent_greedy_requests_match_generate(serve_models, server):
    """Requests decoded together in one batch give what each gives alone."""
    model, _, tokenizer = serve_models[:3]
    prompts = [f"Sort these words {i}: pear apple fig" * (1 + i % 3) for i in range(8)]
    want = [generate(model, tokenizer, p, max_new_tokens=16, temperature=0) for p in prompts]
    got = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def worker(i):
        barrier.wait()
        r = httpx.post(server + "/v1/completions", json={"model": "samout", "prompt": prompts[i],
                                                         "max_tokens": 16, "temperature": 0}, timeout=60)
        got[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert got == want
    assert httpx.get(server + "/v1/health").json()["models"]["samout"]["peak_active"] > 1


def test_n_choices_and_seeds(serve_models, client):
    model, _, tokenizer = serve_models[:3]
    answer = client.completions.create(model="samout", prompt=[1, 20, 30], max_tokens=8, temperature=1.0,
                                       n=2, seed=123, extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    for j, text in enumerate(texts):
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=123 + j, stop_at_eot=False)
        want = list(stream_ids(model, [1, 20, 30], params))
        assert text == tokenizer.decode(want, skip_special_tokens=True)
    assert answer.usage.completion_tokens == 16 and answer.usage.prompt_tokens == 3


def test_stop_string_ends_the_text(serve_models, client):
    model, _, tokenizer = serve_models[:3]
    full = generate(model, tokenizer, "Hello", max_new_tokens=20, temperature=0)
    stop = full[5:7]
    assert stop and len(full) > 7
    want = full[:full.find(stop)]
    for stream in (False, True):
        answer = client.completions.create(model="samout", prompt="Hello", max_tokens=20, temperature=0,
                                           stop=[stop], stream=stream)
        if stream:
            chunks = list(answer)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = answer.choices[0].text, answer.choices[0].finish_reason
        assert (text, reason) == (want, "stop")


def test_state_cache_reports_cached_tokens_and_gives_cold_tokens(serve_models, client):
    model, _, tokenizer = serve_models[:3]
    prompt = [1] + list(range(40, 70))
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_at_eot=False)
    greedy = list(stream_ids(model, prompt, params))
    first = client.completions.create(model="samout", prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert first.choices[0].text == tokenizer.decode(greedy, skip_special_tokens=True)
    follow = prompt + greedy + [80, 81, 82]
    kwargs = dict(prompt=follow, max_tokens=8, temperature=0.9, seed=7, extra_body={"ignore_eos": True})
    hit = client.completions.create(model="samout", **kwargs)
    cold = client.completions.create(model="plain", **kwargs)  # same weights, no cache
    assert hit.usage.prompt_tokens_details.cached_tokens == len(prompt) + len(greedy) - 1
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert hit.choices[0].text == cold.choices[0].text
    # Chat: a follow-up turn resumes at least after the first turn's prompt.
    turn = [{"role": "user", "content": "Hello there, how are you?"}]
    reply = client.chat.completions.create(model="samout", messages=turn, max_tokens=6, temperature=0)
    turn2 = turn + [{"role": "assistant", "content": reply.choices[0].message.content},
                    {"role": "user", "content": "What is 2 + 3?"}]
    again = client.chat.completions.create(model="samout", messages=turn2, max_tokens=6, temperature=0)
    first_prompt = len(render_ids(tokenizer, turn, add_generation_prompt=True))
    assert again.usage.prompt_tokens_details.cached_tokens >= first_prompt
    assert again.choices[0].message.content == chat_reference(model, tokenizer, turn2, 6)


BAD_BODIES = [
    ("{not json", "json"),
    ([1, 2, 3], None),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x" * 400}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "n": 100}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),  # over --max-logprobs
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "top_logprobs": 3}, "top_logprobs"),  # chat's field
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": [1, "x"]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x", "stop": [None]}, "stop"),
    ({"model": "transformer", "prompt": [1] * 20, "max_tokens": 500}, "max_tokens"),  # past 512
    # Strict input: invalid Unicode, strings for numbers, options this server does not implement.
    ({"prompt": "a\ud800"}, "prompt"),
    ({"prompt": ["fine", "a\udfff b"]}, "prompt"),
    ({"prompt": "x", "stop": ["\ud800"]}, "stop"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "top_p": "0.5"}, "top_p"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "strin"}}}}, "response_format"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"prompt": "x", "tool_choice": "auto"}, "tool_choice"),
    ({"prompt": "x", "parallel_tool_calls": True}, "parallel_tool_calls"),
    # Penalties and bias: out of range.
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "repetition_window": 0}, "repetition_window"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1000000": 1}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "frequency_penalty": "0"}, "frequency_penalty"),
    ({"prompt": "x", "no_such_option": 1}, "no_such_option"),
    ({"prompt": "x", "\ud800": 1}, None),  # a field name that is not valid Unicode
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_completion_requests_are_openai_400s(server, body, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server + "/v1/completions", content=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param not in (None, "json"):
        assert error["param"] == param


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
      "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"x": {"type": "strin"}}}}}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]}, "tools"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{oops"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),  # no logprobs
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -2.5}, "presence_penalty"),
])
def test_bad_chat_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server + "/v1/chat/completions", content=json.dumps({"model": "samout", **body}),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_what_clients_send_and_the_server_honours_is_accepted(server):
    """Options at their "off" values, `user`, and integer numbers stay accepted."""
    body = {"model": "samout", "prompt": "Hi", "max_tokens": 2, "temperature": 1, "top_p": 1, "user": "u-1",
            "frequency_penalty": 0, "presence_penalty": 0.0, "response_format": {"type": "text"},
            "tool_choice": "none", "stop_token_ids": [], "repetition_penalty": 1.0, "logprobs": None}
    assert httpx.post(server + "/v1/completions", json=body).status_code == 200
    chat = {"model": "samout", "messages": [{"role": "user", "content": "hi ✓ 中文", "name": None}],
            "max_completion_tokens": 2, "temperature": 0.5, "stream_options": None}
    assert httpx.post(server + "/v1/chat/completions", json=chat).status_code == 200


def test_bad_field_shapes_say_what_is_accepted(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": [1, "x"]})
    assert r.status_code == 400 and "a list of lists of token ids" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", json={"model": "transformer", "prompt": [1] * 20,
                                                     "max_tokens": 500})
    assert "max_tokens must lie in [1, 492]" in r.json()["error"]["message"]


def test_a_body_that_is_not_json_says_so(server):
    r = httpx.post(server + "/v1/completions", data={"prompt": "x"})  # a form, as curl -d sends
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_a_too_long_chat_prompt_is_a_400(server):
    messages = [{"role": "user", "content": "word " * 200}]
    r = httpx.post(server + "/v1/chat/completions", json={"model": "samout", "messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"limit of {MAX_PROMPT_TOKENS}" in error["message"]


def test_lists_of_token_id_prompts_are_one_choice_each(serve_models, client):
    model = serve_models[0]
    prompts = [[1, 20, 30], [1, 40, 41, 42, 43]]
    answer = client.completions.create(model="samout", prompt=prompts, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eot=False)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.prompt_tokens == 8 and answer.usage.completion_tokens == 12
    tokenizer = serve_models[2]
    for choice, ids in zip(answer.choices, prompts):
        assert choice.text == tokenizer.decode(list(stream_ids(model, ids, params)), skip_special_tokens=True)


@pytest.mark.parametrize("body,status,code", [
    ({"model": "plain", "messages": [{"role": "user", "content": "hi"}]}, 400, "no_chat_template"),
    ({"model": "samout", "messages": []}, 400, None),
    ({"model": "samout", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": "samout", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
])
def test_bad_chat_requests(server, body, status, code):
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_completions_still_work_without_chat_template(serve_models, client):
    model, _, tokenizer = serve_models[:3]
    answer = client.completions.create(model="plain", prompt="Hello", max_tokens=5, temperature=0)
    assert answer.choices[0].text == generate(model, tokenizer, "Hello", max_new_tokens=5, temperature=0)
    assert [m.id for m in client.models.list().data] == ["samout", "transformer", "plain"]


def test_unknown_path_is_an_openai_404(server):
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key_required_when_set(serve_models):
    model, _, tokenizer = serve_models[:3]
    models = [served_model(model, tokenizer, "samout")]
    with running_server(models, ServerSettings(api_key="s3cret")) as url:
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # liveness stays open
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="samout", prompt="Hi", max_tokens=2).usage.completion_tokens >= 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()


def test_full_queue_is_429_with_retry_after(serve_models):
    model, _, tokenizer = serve_models[:3]
    models = [served_model(model, tokenizer, "samout", max_batch=1, max_queue=0)]
    # The busy request must not end by itself before the second one arrives, however fast the
    # machine: a generous limit, and it is cancelled when its stream is closed.
    settings = ServerSettings(max_tokens_limit=10**7)
    with running_server(models, settings) as url, httpx.Client(timeout=30) as http:
        long = {"prompt": "Hi", "max_tokens": 10**7, "stream": True, "ignore_eos": True, "temperature": 0}
        with http.stream("POST", url + "/v1/completions", json=long) as busy:
            # The first token: the only slot is taken. (Keep the iterator: a discarded one is
            # closed at once, which closes the response and frees the slot.)
            lines = busy.iter_lines()
            next(lines)
            r = http.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        # Closing the stream freed the slot.
        for _ in range(100):
            if http.get(url + "/v1/health").json()["models"]["samout"]["active"] == 0:
                break
            threading.Event().wait(0.05)
        assert http.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_page_is_served(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "samout chat" in r.text and "http://" not in r.text.replace("http://www.w3.org", "")


def test_health_reports_memory_and_the_state_cache(server):
    health = httpx.get(server + "/v1/health").json()
    memory = health["memory"]
    assert memory["rss_bytes"] > 50 * 2**20  # torch and a model are resident
    assert memory["heap_in_use_bytes"] > 0 and memory["heap_free_bytes"] >= 0
    cache = health["models"]["samout"]["cache"]
    assert cache["bytes"] <= cache["budget_bytes"] and cache["mapped_bytes"] >= 0
    assert health["models"]["plain"]["cache"] is None  # served with --state-cache-mb 0
