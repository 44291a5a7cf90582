"""`samout bench serve` end to end at the smallest size: the figures are there, the state
cache hits after the whole history and misses otherwise, and the engine's state bytes per
session are SamOut's exact state size and the Transformer's exact KV cache."""

from __future__ import annotations

import json

from samout.bench.serve import ServeBenchSettings, format_serve, run_serve_bench
from samout.config import SamOutConfig


def test_serve_bench_smallest(tmp_path):
    s = ServeBenchSettings(preset="tiny", clients=[1, 2], histories=[24], max_tokens=3, follow_up_tokens=4,
                           repeats=1, prefill_chunk=16)
    results = run_serve_bench(s, tmp_path, command="test", progress=False)
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved["throughput"] == results["throughput"] and len(results["throughput"]) == 4
    for p in results["throughput"]:
        assert p["tokens"] == 3 * p["clients"] and p["tokens_per_s"] > 0 and p["ttft_p50_s"] > 0
        assert p["peak_rss_bytes"] > 0
        assert p["idle_heap_bytes"] > 0 and "decode_heap_growth_bytes" in p and "held_heap_growth_bytes" in p
        assert len(p["runs_tokens_per_s"]) == 1 and p["runs_tokens_per_s"][0] == p["tokens_per_s"]
    config = SamOutConfig.from_preset("tiny")
    exact = config.num_layers * config.num_heads * config.head_dim * 4  # float32 running max per layer
    # The Transformer's KV cache at its longest: the history and every generated token but the last
    # (sampled, never fed). Alone that is the peak exactly; with 2 clients every client has the same
    # lengths (the padded batch adds nothing), but the peak may fall while one is still prefilling.
    longest = 2 * config.num_layers * config.hidden_size * 4 * (24 + 3 - 1)
    for p in results["throughput"]:
        if p["model"] == "samout":
            assert p["state_bytes_per_session"] == exact
        elif p["clients"] == 1:
            assert p["state_bytes_per_session"] == longest
        else:
            assert longest / 2 <= p["state_bytes_per_session"] <= longest
    for p in results["follow_up"]:
        assert (p["cached_tokens_hit"], p["cached_tokens_miss"]) == (24, 0)
    # The next turn of each conversation resumes after its whole 24-token history.
    assert len(results["conversations"]) == 4
    for p in results["conversations"]:
        assert p["tokens"] == 3 * p["clients"] and p["cached_tokens"] == 24 * p["clients"]
        assert p["prompt_tokens"] == (24 + 4) * p["clients"]
    assert all((tmp_path / name).is_file() for name in results["plots"])
    text = format_serve(results)
    assert "SamOut/Transformer" in text and "next turn of a conversation" in text
    assert "per session (slope over 1-2 clients)" in text and "heap kept after the request" in text
