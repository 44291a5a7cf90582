"""`samout bench stores` at the smallest size: every tier answers the follow-up from the
history's state (the bench raises otherwise) and the figures are there."""

from __future__ import annotations

import shutil

from samout.bench.stores import TIERS, StoresBenchSettings, format_stores, run_stores_bench


def test_stores_bench_smallest(tmp_path):
    s = StoresBenchSettings(preset="tiny", history=24, follow_up_tokens=4, repeats=2)
    results = run_stores_bench(s, "test", state_cache_dir=str(tmp_path))
    points = {(p["model"], p["tier"]): p for p in results["points"]}
    assert set(points) == {(m, t) for m in ("samout", "transformer") for t in TIERS}
    for (_, tier), p in points.items():
        if tier == "redis" and shutil.which("redis-server") is None:
            assert p["skipped"]
            continue
        assert p["ttft_s"] > 0 and len(p["ttfts_s"]) == 2
        assert (p["lookup_s"] is None) == (tier == "none")
    assert points[("samout", "disk")]["state_bytes"] == points[("samout", "memory")]["state_bytes"]
    assert "x memory" in format_stores(results)
