"""Issue 23's hardening, each attack reproduced against a live server on 127.0.0.1: a
non-streaming client that goes away, stalled connections, keyless /health, the page's
security headers, DNS rebinding, and usage reported once per stream."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from samout.chat.template import DEFAULT_CHAT_TEMPLATE
from samout.serve.api_server import ServerSettings
from samout.serve.loading import served_model
from samout.serve.serving import LOOPBACK_HOSTS
from tests.serve.serve_fixtures import running_server


def wait_until(condition, seconds: float) -> float:
    """Seconds until `condition()` held (polled every 5 ms), or inf past `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if condition():
            return time.monotonic() - start
        time.sleep(0.005)
    return float("inf")


def raw_request(port: int, path: str, body: dict, host: str = "127.0.0.1") -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_a_non_streaming_client_that_leaves_frees_its_slot(serve_models, path, body):
    model, _, tokenizer = serve_models[:3]
    served = served_model(model, tokenizer, "samout", chat_template=DEFAULT_CHAT_TEMPLATE)
    engine = served.engine
    with running_server([served], ServerSettings(max_tokens_limit=10**7)) as url:
        body = {**body, "max_tokens": 10**7, "ignore_eos": True, "temperature": 0}
        sock = raw_request(port_of(url), path, body)
        assert wait_until(lambda: engine.stats()["tokens_generated"] > 20, 30) < 30
        sock.close()  # mid-request: tokens are still arriving
        assert wait_until(lambda: engine.stats()["active"] == 0, 5) < 0.1
        generated = engine.stats()["tokens_generated"]
        time.sleep(0.2)
        assert engine.stats()["tokens_generated"] <= generated + 1  # nothing more for it
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def sse_chunks(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_reports_usage_once(serve_models, include_usage):
    """Usage came on every choice's last chunk and again in the usage chunk: a client adding
    usage across chunks counted tokens three times (n=2). OpenAI: only the usage chunk."""
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")]) as url:
        body = {"prompt": "Hi", "max_tokens": 5, "n": 2, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": include_usage}}
        chunks = sse_chunks(httpx.post(url + "/v1/completions", json=body, timeout=30))
    with_usage = [c for c in chunks if c.get("usage")]
    assert sorted(c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                  and c["choices"][0]["finish_reason"]) == ["length", "length"]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 10
    else:
        assert with_usage == []


def test_health_is_liveness_only_and_the_details_need_the_key(serve_models):
    """/health listed models and memory to anyone, and ?reset_peaks=true cost ~150 ms of the
    server's thread per keyless call."""
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")], ServerSettings(api_key="k")) as url:
        open_ = httpx.get(url + "/health", params={"reset_peaks": "true"})
        assert open_.status_code == 200 and open_.json() == {"status": "ok"}
        assert httpx.get(url + "/v1/health").status_code == 401
        assert httpx.get(url + "/v1/health", params={"reset_peaks": "true"}).status_code == 401
        details = httpx.get(url + "/v1/health", headers={"Authorization": "Bearer k"}).json()
        assert details["models"]["samout"]["active"] == 0 and details["memory"]["rss_bytes"] > 0
        start = time.monotonic()
        with httpx.Client() as http:
            for _ in range(50):
                http.get(url + "/health", params={"reset_peaks": "true"})
        assert time.monotonic() - start < 2.5  # 50 calls: no heap trimming, no engine locks


def test_the_page_and_the_api_send_security_headers(serve_models):
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")]) as url:
        page = httpx.get(url + "/")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and "<script>" not in page.text and "<style>" not in page.text
        for r in (page, httpx.get(url + "/v1/models"), httpx.post(url + "/v1/completions", json={})):
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        script = httpx.get(url + "/static/chat.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert "loadModels" in script.text
        assert httpx.get(url + "/static/chat.css").headers["content-type"].startswith("text/css")
        assert httpx.get(url + "/static/index.html").status_code == 404
        assert httpx.get(url + "/static/..%2Fapi_server.py").status_code == 404


FOREIGN = ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80"]
LOOPBACK = ["localhost", "LOCALHOST:8000", "127.0.0.1:1", "[::1]:8000", "[::1]", "models.internal:80"]


def test_a_loopback_server_refuses_foreign_hosts(serve_models):
    """DNS rebinding: a page at evil.example, its name re-pointed at 127.0.0.1, reaches the
    loopback server with `Host: evil.example`, and drove it when no key was set."""
    model, _, tokenizer = serve_models[:3]
    settings = ServerSettings(allowed_hosts=LOOPBACK_HOSTS | {"models.internal"})
    completion = {"prompt": "Hi", "max_tokens": 2}
    with running_server([served_model(model, tokenizer, "samout")], settings) as url, httpx.Client() as http:
        for host in FOREIGN + LOOPBACK:
            answers = [http.get(url + "/", headers={"Host": host}),
                       http.get(url + "/v1/models", headers={"Host": host}),
                       http.post(url + "/v1/completions", json=completion, headers={"Host": host})]
            for r in answers:
                if host in LOOPBACK:
                    assert r.status_code == 200, host
                else:
                    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", host


def test_a_server_without_a_host_list_answers_any_host(serve_models):
    model, _, tokenizer = serve_models[:3]
    settings = ServerSettings(allowed_hosts=None)
    with running_server([served_model(model, tokenizer, "samout")], settings) as url:
        assert httpx.get(url + "/v1/models", headers={"Host": "models.example.com"}).status_code == 200


def closed_after(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """(seconds until the server closed `sock`, what it sent); inf if still open after `seconds`."""
    start, received = time.monotonic(), b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return float("inf"), received
    return time.monotonic() - start, received


TIMEOUTS = ServerSettings(header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=1)


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"])
def test_half_sent_headers_are_closed_in_time(serve_models, sent):
    """Slowloris: a connection that sends nothing, or half its headers, was held forever."""
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")], TIMEOUTS) as url:
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(sent)
            seconds, answer = closed_after(sock, 5)
        assert 0.4 < seconds < 1.5
        assert answer.startswith(b"HTTP/1.1 408") == bool(sent)
        assert httpx.get(url + "/health").status_code == 200


def test_a_stalled_body_is_answered_408_and_closed(serve_models):
    model, _, tokenizer = serve_models[:3]
    served = served_model(model, tokenizer, "samout")
    with running_server([served], TIMEOUTS) as url:
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"Hi")
            seconds, answer = closed_after(sock, 5)
        assert 0.4 < seconds < 1.5
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "body_timeout"
        assert served.engine.stats()["steps"] == 0  # nothing was generated for it
        ok = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_an_idle_kept_alive_connection_is_closed(serve_models):
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")], TIMEOUTS) as url:
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            seconds, answer = closed_after(sock, 5)
        assert answer.startswith(b"HTTP/1.1 200") and 0.8 < seconds < 2.5


def test_a_slow_but_steady_request_within_the_timeouts_is_served(serve_models):
    model, _, tokenizer = serve_models[:3]
    with running_server([served_model(model, tokenizer, "samout")], TIMEOUTS) as url:
        data = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            for part in (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                         f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode(),
                         data[:5], data[5:]):
                sock.sendall(part)
                time.sleep(0.15)
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def test_message_fields_the_server_does_not_implement_are_refused(serve_models):
    """A message's `name` or an unknown key used to be dropped silently; OpenAI's "unset" values
    (what the openai client sends back with an assistant reply) are still accepted."""
    model, _, tokenizer = serve_models[:3]
    served = served_model(model, tokenizer, "samout", chat_template=DEFAULT_CHAT_TEMPLATE)
    with running_server([served]) as url:
        def ask(messages):
            return httpx.post(url + "/v1/chat/completions", timeout=30,
                              json={"messages": messages, "max_tokens": 1, "temperature": 0})

        r = ask([{"role": "user", "content": "hi", "name": "ann"}])
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].name"
        r = ask([{"role": "user", "content": "hi", "colour": "red"}])
        assert r.status_code == 400 and "colour" in r.json()["error"]["message"]
        r = ask([{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "yes", "refusal": None, "annotations": [], "audio": None,
                  "function_call": None, "name": None},
                 {"role": "user", "content": "and?"}])
        assert r.status_code == 200, r.text
