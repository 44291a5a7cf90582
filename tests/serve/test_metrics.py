"""GET /metrics (Prometheus text format) and the samout.access log line."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from samout.chat.template import DEFAULT_CHAT_TEMPLATE
from samout.serve.api_server import ServerSettings
from samout.serve.loading import served_model
from tests.serve.serve_fixtures import running_server

PROMPT = "Hello there, metrics"


@pytest.fixture(scope="module")
def server(serve_models):
    model, _, tokenizer = serve_models[:3]
    served = served_model(model, tokenizer, "samout", chat_template=DEFAULT_CHAT_TEMPLATE)
    with running_server([served]) as url:
        yield url


def scrape(url: str, **kw) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics answer."""
    answer = httpx.get(url + "/metrics", **kw)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted({"model": "samout", **labels}.items()))), 0.0)


def stream_usage(url: str, path: str, body: dict) -> dict:
    with httpx.stream("POST", url + path, json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}) as answer:
        lines = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return json.loads(lines[-2])["usage"]


def test_the_counters_match_the_usage_the_responses_reported(server):
    before = scrape(server)
    completion = {"model": "samout", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    chat = {"model": "samout", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 6,
            "temperature": 0}
    answers = [httpx.post(server + "/v1/completions", json=completion).json(),
               httpx.post(server + "/v1/chat/completions", json=chat).json()]
    usages = [a["usage"] for a in answers]
    usages += [stream_usage(server, "/v1/completions", completion),
               stream_usage(server, "/v1/chat/completions", chat)]
    after = scrape(server)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("samout_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("samout_generated_tokens_total") == sum(u["completion_tokens"] for u in usages)
    reasons = [a["choices"][0]["finish_reason"] for a in answers]
    assert reasons[0] == "length"
    finished = sum(grew("samout_request_success_total", finish_reason=r) for r in ("stop", "length", "abort"))
    assert finished == 4
    assert grew("samout_request_success_total", finish_reason="length") >= 2
    assert grew("samout_e2e_request_latency_seconds_count") == 4
    assert 2 <= grew("samout_time_to_first_token_seconds_count") <= 4
    assert grew("samout_inter_token_latency_seconds_count") >= 2 * 7  # the two 8-token completions
    assert value(after, "samout_requests_running") == 0 and value(after, "samout_requests_waiting") == 0
    assert ("samout_state_cache_bytes", (("model", "samout"),)) in after


def test_a_follow_up_that_extends_a_cached_prompt_counts_a_hit(server, serve_models):
    tokenizer = serve_models[2]
    ids = tokenizer.encode("A prompt the cache keeps for its follow-up").ids
    body = {"model": "samout", "max_tokens": 2, "temperature": 0}
    httpx.post(server + "/v1/completions", json={**body, "prompt": ids}).raise_for_status()
    hits = value(scrape(server), "samout_state_cache_hits_total")
    follow = httpx.post(server + "/v1/completions", json={**body, "prompt": ids + ids[:3]}).json()
    assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    after = scrape(server)
    assert value(after, "samout_state_cache_hits_total") == hits + 1
    assert value(after, "samout_state_cache_misses_total") >= 1
    assert value(after, "samout_state_cache_bytes") > 0


def test_metrics_need_the_key_when_one_is_set(serve_models):
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")], ServerSettings(api_key="k")) as url:
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        assert ("samout_requests_running", (("model", "samout"),)) in scrape(
            url, headers={"Authorization": "Bearer k"})


def test_metrics_are_open_without_a_key(server):
    assert ("samout_requests_waiting", (("model", "samout"),)) in scrape(server)


def test_one_access_log_line_per_request_without_the_prompt(server, caplog):
    caplog.set_level(logging.INFO, logger="samout.access")
    secret = "a secret prompt nobody may log"
    body = {"model": "samout", "prompt": secret, "max_tokens": 3, "ignore_eos": True}
    answer = httpx.post(server + "/v1/completions?x=1", json=body).json()
    usage = answer["usage"]
    deadline = time.monotonic() + 5
    while not [r for r in caplog.records if r.name == "samout.access"] and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "samout.access"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("POST /v1/completions 200 ") and line.endswith("s")
    assert f"prompt_tokens={usage['prompt_tokens']} generated_tokens=3" in line
    assert "secret" not in line and "x=1" not in line
