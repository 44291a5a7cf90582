"""A small load test: 200 requests from 32 client threads, with clients that hang up mid-stream
and malformed bodies mixed in. Every well-formed request gets its complete, correct answer
(greedy, so the answer is known in advance) and the server is healthy afterwards."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx

from samout.generation import generate
from tests.serve.serve_fixtures import running_server, serve_pair

REQUESTS, CLIENTS, MAX_TOKENS = 200, 32, 8


def test_load_with_disconnects_and_malformed_bodies(serve_models, seed):
    model, transformer, tokenizer = serve_models[:3]
    prompts = [f"Hello there {i}, how are you?" for i in range(6)]
    want = {(name, p): generate(m, tokenizer, p, max_new_tokens=MAX_TOKENS, temperature=0)
            for name, m in (("samout", model), ("transformer", transformer)) for p in prompts}
    rng = random.Random(seed)
    kinds = rng.choices(["plain", "stream", "disconnect", "malformed"], weights=[4, 4, 1, 1], k=REQUESTS)
    jobs = list(enumerate(kinds))
    lock = threading.Lock()
    failures: list[str] = []
    done = {"plain": 0, "stream": 0, "disconnect": 0, "malformed": 0}

    models = serve_pair(model, transformer, tokenizer, max_batch=16, max_queue=REQUESTS, prefill_chunk=16)
    with running_server(models) as url:
        def check(i: int, kind: str, http: httpx.Client) -> None:
            name = "samout" if i % 3 else "transformer"
            prompt = prompts[i % len(prompts)]
            body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            if kind == "malformed":
                bad = rng.choice(['{"prompt": ', '{"prompt": "x", "max_tokens": "many"}', "[]",
                                  '{"prompt": "x", "n": 0}', "\xff\xfe"])
                r = http.post(url + "/v1/completions", content=bad,
                              headers={"Content-Type": "application/json"})
                assert r.status_code == 400 and "error" in r.json(), r.text
            elif kind == "plain":
                r = http.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want[(name, prompt)]
            else:
                with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    events = []
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if kind == "disconnect" and len(events) == 2:
                                break  # hang up mid-stream
                if kind == "stream":
                    assert events[-1] == "[DONE]"
                    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
                    assert text == want[(name, prompt)]

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while True:
                    with lock:
                        if not jobs:
                            return
                        i, kind = jobs.pop()
                    try:
                        check(i, kind, http)
                        with lock:
                            done[kind] += 1
                    except Exception as err:  # collected: one failure must not hide the others
                        with lock:
                            failures.append(f"request {i} ({kind}): {type(err).__name__}: {err}")

        start = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "the load test did not finish in time"
        assert not failures, "\n".join(failures[:10])
        assert sum(done.values()) == REQUESTS
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok"
        for _ in range(100):  # hung-up streams are freed
            stats = httpx.get(url + "/v1/health").json()["models"]
            if all(s["active"] == 0 and s["waiting"] == 0 for s in stats.values()):
                break
            time.sleep(0.05)
        assert all(s["active"] == 0 and s["waiting"] == 0 for s in stats.values())
        assert max(s["peak_active"] for s in stats.values()) > 1
        r = httpx.post(url + "/v1/completions", json={"model": "samout", "prompt": prompts[0],
                                                       "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.json()["choices"][0]["text"] == want[("samout", prompts[0])]
        print(f"{REQUESTS} requests in {time.monotonic() - start:.1f} s: {done}")
