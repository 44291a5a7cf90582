"""`samout serve` as a process: it serves two run directories (SamOut and Transformer),
a bad run directory is a one-line error, and SIGINT drains a running stream and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.serve_fixtures import free_port, make_models, save_transformer_run


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    _, transformer, tokenizer = make_models(root / "small")
    save_transformer_run(root / "baseline", transformer, tokenizer)
    return root / "small", root / "baseline"


def test_missing_run_dir_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "samout", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("samout serve: error: run directory not found")


def test_port_in_use_is_one_line_error_before_loading(run_dirs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "samout", "serve", str(run_dirs[0]), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"samout serve: error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another server running there? choose another --port)"]


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379", "--state-store must be redis://HOST:PORT/DB"),
    ("redis://127.0.0.1:{port}/0", "cannot reach the state store redis://127.0.0.1:{port}/0")])
def test_a_bad_or_unreachable_state_store_is_one_line_error(run_dirs, url, message):
    port = free_port()  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "samout", "serve", str(run_dirs[0]), "--port", str(free_port()),
                        "--state-store", url.format(port=port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("samout serve: error: " + message.format(port=port)), last


def test_serve_then_sigint_drains_and_exits_cleanly(run_dirs):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "samout", "serve", *map(str, run_dirs),
                             "--port", str(port), "--state-cache-mb", "8"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["small", "baseline"] and all(m["chat"] for m in models)
        body = {"model": "baseline", "prompt": "Hello", "max_tokens": 200, "stream": True,
                "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGINT)  # mid-stream: the stream must still finish
        assert events[-1] == "[DONE]"
        assert sum(json.loads(e)["usage"]["completion_tokens"] for e in events[:-1]
                   if "usage" in json.loads(e)) == 200
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err


def test_help_lists_every_option(capsys):
    from samout.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ("--dtype {float32,bfloat16,int8}", "--max-prompt-tokens", "--max-tokens-limit",
                   "--state-cache-mb", "--api-key", "--prefill-chunk", "127.0.0.1", "--allowed-host",
                   "--timeout-headers", "--timeout-body", "--timeout-keep-alive",
                   "--max-body-bytes", "--max-prompt-chars", "--max-stop-sequences", "--max-stop-chars",
                   "--max-choices", "--state-cache-dir", "--state-cache-dir-mb", "--state-store",
                   "--state-store-ttl"):
        assert option in out, option


def test_a_loopback_bind_answers_loopback_names_only():
    from samout.commands.serve import allowed_hosts

    loopback = {"localhost", "127.0.0.1", "[::1]"}
    for bind in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert allowed_hosts(bind, []) == loopback, bind
    assert allowed_hosts("127.0.0.1", ["Models.Example:8000"]) == loopback | {"models.example"}
    assert allowed_hosts("0.0.0.0", []) is None and allowed_hosts("192.168.1.5", []) is None
    assert allowed_hosts("0.0.0.0", ["api.example"]) == loopback | {"api.example"}


@pytest.mark.parametrize("flag", ["--timeout-headers", "--timeout-body", "--timeout-keep-alive"])
def test_a_timeout_must_be_positive(run_dirs, flag):
    r = subprocess.run([sys.executable, "-m", "samout", "serve", *map(str, run_dirs), flag, "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"{flag} must be more than 0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--max-body-bytes", "--max-prompt-chars", "--max-stop-sequences",
                                  "--max-stop-chars", "--max-choices"])
def test_a_limit_below_one_is_one_line_error(tmp_path, capsys, flag):
    from samout.cli import main

    # Checked before the run directory is even looked at.
    assert main(["serve", str(tmp_path / "nope"), flag, "0"]) == 1
    assert capsys.readouterr().err.strip() == f"samout serve: error: {flag} must be at least 1"
