"""The chat page at / in a real headless Chromium (Playwright driving Debian's `chromium`):
type a message, watch the streamed reply appear piece by piece, stop a long reply, start a
new chat. Fails (not skips) under CI=true when chromium is missing: CI must run it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.serve_fixtures import running_server, serve_pair
from tests.serve.test_api_server import chat_reference

CHROMIUM = Path(os.environ.get("SAMOUT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the browser test must run)")
        pytest.skip(message)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_chat_page_streams_stops_and_starts_a_new_chat(serve_models, browser):
    model, transformer, tokenizer = serve_models[:3]
    message = "Hello there, how are you?"
    want = chat_reference(model, tokenizer, [{"role": "user", "content": message}], 24)
    assert want.strip(), "the reference reply is empty: the test would prove nothing"
    with running_server(serve_pair(model, transformer, tokenizer)) as url:
        page = browser.new_page()
        # The server's Content-Security-Policy allows no inline code: the page must need none.
        # (So the waits below are functions: a string expression is an eval, which it forbids.)
        violations = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text
                else None)
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelectorAll('#model option').length === 2")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        # Record every text the reply bubble shows, to see it grow while streaming.
        page.evaluate("""() => {
            window.seen = [];
            new MutationObserver(() => {
                const b = document.querySelector('.msg.assistant');
                if (b && b.textContent) window.seen.push(b.textContent);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                             characterData: true});
        }""")
        page.fill("#input", message)
        page.click("#send")
        page.wait_for_function("() => document.getElementById('send').disabled === false "
                               "&& document.querySelector('.msg.assistant') !== null", timeout=60_000)
        assert page.inner_text(".msg.user") == message
        assert page.eval_on_selector(".msg.assistant", "b => b.textContent") == want
        seen = page.evaluate("window.seen")
        assert len(set(seen)) > 1 and seen[-1] == want  # it arrived in pieces
        assert all(want.startswith(s) for s in seen)
        assert page.query_selector(".msg.error") is None

        # A long reply, stopped: the button ends the stream and the server frees the slot. (The
        # tiny random model may end a reply at once; ignore_eos added on the way keeps it going.)
        def keep_going(route):
            body = json.loads(route.request.post_data)
            route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

        page.route("**/v1/chat/completions", keep_going)
        page.fill("#max-tokens", "4000")
        page.fill("#temperature", "1")
        page.fill("#input", "Tell me a long story.")
        page.click("#send")
        page.wait_for_function(
            "() => document.querySelectorAll('.msg.assistant')[1]?.textContent.length > 0", timeout=60_000)
        page.click("#stop")
        page.wait_for_function("() => document.getElementById('stop').disabled === true")
        for _ in range(100):
            if httpx.get(url + "/v1/health").json()["models"]["samout"]["active"] == 0:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/v1/health").json()["models"]["samout"]["active"] == 0
        assert page.query_selector(".msg.error") is None

        page.unroute("**/v1/chat/completions")
        page.click("#new-chat")
        assert page.query_selector_all("#messages .msg") == []
        page.fill("#max-tokens", "24")
        page.fill("#temperature", "0")
        page.fill("#input", message)
        page.click("#send")
        page.wait_for_function("() => document.getElementById('send').disabled === false "
                               "&& document.querySelector('.msg.assistant') !== null", timeout=60_000)
        # A new chat starts from scratch: the same first message gives the same first reply.
        assert page.eval_on_selector(".msg.assistant", "b => b.textContent") == want
        assert violations == []
        assert len(page.query_selector_all("#messages .msg")) == 2
        page.close()
