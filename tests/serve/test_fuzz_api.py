"""Property-based fuzz of the HTTP API over its own OpenAPI schema (`app.openapi()`), with
schemathesis, against a live server on 127.0.0.1: every operation, with requests that fit the
schema (positive) and requests that break it (negative), without and with an API key; each
JSON body is sent again with a lone surrogate in every string (which no generator draws).

Each answer must be no 5xx, within a per-call timeout (no hang), of a status, media type and
(JSON) shape the schema documents; every 4xx is OpenAI's error body; a request breaking the
schema is refused. Keyless calls to a keyed server are 401s that cost the engine nothing.

A tiny model, max_tokens at most 4 and small limits keep a call cheap. Under CI=true the
Hypothesis profile "ci" (tests/conftest.py) derandomizes the examples.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from samout.chat.template import DEFAULT_CHAT_TEMPLATE
from samout.serve.api_server import ServerSettings, build_app
from samout.serve.loading import served_model
from tests.serve.serve_fixtures import running_server

KEY = "fuzz-key"
CALL_TIMEOUT = 10.0  # seconds: a call that takes longer is a hang
# Examples per operation and generation mode: POST bodies have far more to explore.
# SAMOUT_FUZZ_EXAMPLES=N runs N each, for a longer hunt.
EXAMPLES = {"POST": 40, "GET": 15}
if os.environ.get("SAMOUT_FUZZ_EXAMPLES"):
    EXAMPLES = dict.fromkeys(EXAMPLES, int(os.environ["SAMOUT_FUZZ_EXAMPLES"]))
SETTINGS = ServerSettings(max_tokens_limit=4, max_prompt_tokens=64, max_prompt_chars=512,
                          max_body_bytes=64 * 1024, max_stop_sequences=2, max_stop_chars=16,
                          header_timeout=5, body_timeout=5)
OPERATIONS = ["GET /", "GET /static/{name}", "GET /health", "GET /v1/health", "GET /metrics",
              "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"]
# The operations with parameters or a body, which requests can break (negative examples).
WITH_INPUT = ["GET /v1/health", "POST /v1/completions", "POST /v1/chat/completions"]
KEYED = ("/v1/", "/metrics")
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@schemathesis.check
def openai_error_body(ctx, response, case) -> bool | None:
    """Every 4xx (and 5xx) carries OpenAI's {"error": {"message", "type", "param", "code"}}."""
    if response.status_code < 400:
        return None
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return None


def with_lone_surrogates(value):
    """`value` with a lone surrogate after every string in it: valid JSON (json.dumps writes
    it as the escape \\ud800) that no UTF-8 encoder takes. Hypothesis and schemathesis never
    draw lone surrogates, and a prompt holding one was a 500 from the tokenizer."""
    if isinstance(value, str):
        return value + "\ud800"
    if isinstance(value, list):
        return [with_lone_surrogates(v) for v in value]
    if isinstance(value, dict):  # a message's role kept, so that its content is what is refused
        return {k: v if k == "role" else with_lone_surrogates(v) for k, v in value.items()}
    return value


def _models(serve_models):
    model, _, tokenizer = serve_models[:3]
    return [served_model(model, tokenizer, "samout", chat_template=DEFAULT_CHAT_TEMPLATE, max_batch=4,
                         max_queue=4)]


@pytest.fixture(scope="module")
def schema(serve_models):
    return schemathesis.openapi.from_dict(build_app(_models(serve_models), SETTINGS).openapi())


@pytest.fixture(scope="module", params=[None, KEY], ids=["keyless-server", "keyed-server"])
def server(request, serve_models):
    """(base URL, the served models, the key): one server per key setting, for the module."""
    models = _models(serve_models)
    settings = ServerSettings(**{**vars(SETTINGS), "api_key": request.param})
    with running_server(models, settings) as url:
        yield url, models, request.param


def fuzz(schema, label: str, mode: GenerationMode, run_case) -> None:
    """Run `run_case(case)` on the operation's examples: bounded, no shrinking past a failure."""
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[label.split()[0]], deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def each(case):
        run_case(case)

    each()


def test_the_schema_describes_every_route_and_its_bodies(schema):
    """A route outside the schema would escape the fuzz; a body the schema does not describe
    would be fuzzed with nothing."""
    labels = sorted(op.ok().label for op in schema.get_all_operations())
    assert labels == sorted(OPERATIONS)
    raw = schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = raw["paths"][path]["post"]
        assert operation["requestBody"]["required"]
        assert "422" not in operation["responses"]  # FastAPI's; this server answers 400
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    properties = raw["components"]["schemas"]["CompletionRequest"]["properties"]
    assert properties["best_of"]["enum"] == [None, 1]  # an unimplemented field: only its "off" values
    assert {"minimum": 0, "type": "integer"} in properties["logprobs"]["anyOf"]  # implemented: its type
    assert raw["components"]["schemas"]["CompletionRequest"]["additionalProperties"] is False


@pytest.mark.parametrize("label,mode", [(label, GenerationMode.POSITIVE) for label in OPERATIONS]
                         + [(label, GenerationMode.NEGATIVE) for label in WITH_INPUT])
def test_fuzz_the_api(schema, server, label, mode):
    url, models, key = server
    engine = models[0].engine
    keyed = key is not None and any(label.split()[1].startswith(p) for p in KEYED)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    steps = engine.stats()["steps"]
    statuses: Counter[int] = Counter()

    with requests.Session() as session:
        def run_case(case):
            start = time.perf_counter()
            response = case.call(base_url=url, session=session, headers=headers, timeout=CALL_TIMEOUT)
            assert time.perf_counter() - start < CALL_TIMEOUT
            statuses[response.status_code] += 1
            if response.status_code >= 400:
                statuses[response.json()["error"]["message"][:70]] += 1
            case.validate_response(response, checks=CHECKS, additional_checks=[openai_error_body],
                                   headers=headers)
            if isinstance(case.body, dict):  # and again with a lone surrogate in every string
                tainted = session.post(url + case.path, data=json.dumps(with_lone_surrogates(case.body)),
                                       headers={"Content-Type": "application/json", **headers},
                                       timeout=CALL_TIMEOUT)
                assert tainted.status_code < 500, tainted.text
                if tainted.status_code >= 400:
                    assert set(tainted.json()["error"]) == {"message", "type", "param", "code"}, tainted.text
            if keyed:  # and without the key: a 401 at a constant cost, whatever the request
                start = time.perf_counter()
                bare = case.call(base_url=url, session=session, timeout=CALL_TIMEOUT)
                assert bare.status_code == 401, bare.text
                assert bare.json()["error"]["code"] == "invalid_api_key"
                assert time.perf_counter() - start < 2.0  # a constant: no body parsed, no engine

        fuzz(schema, label, mode, run_case)
    print(label, mode.value, dict(statuses))
    if mode is GenerationMode.NEGATIVE:  # nothing breaking the schema reached the engine
        assert engine.stats()["steps"] == steps
