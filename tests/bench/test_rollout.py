"""`samout bench rollout`: G rollouts from one prompt, forked SamOut state vs copied KV cache."""

from __future__ import annotations

import torch

from samout.bench.rollout import measure


def test_forked_state_stays_fixed_and_the_kv_cache_grows():
    result = measure("tiny", num=3, tokens=5, prompt_tokens=7, repeats=1, device=torch.device("cpu"))
    samout_row = next(r for name, r in result["models"].items() if name.startswith("samout"))
    transformer = result["models"]["transformer"]
    assert samout_row["forked_state_bytes"] == 3 * samout_row["prompt_state_bytes"]
    assert samout_row["final_state_bytes"] == samout_row["forked_state_bytes"]  # fixed size
    assert transformer["forked_state_bytes"] == 3 * transformer["prompt_state_bytes"]
    assert transformer["final_state_bytes"] == transformer["forked_state_bytes"] * 12 // 7  # 7 -> 12 tokens
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in result["models"].values())
