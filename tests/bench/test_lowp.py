"""`samout bench speed --lowp` at tiny size: every table is filled and consistent."""

import torch

from samout.bench.lowp import LowpSettings, decode_table, format_lowp, memory_table


def test_lowp_tables_at_tiny_size(seed):
    s = LowpSettings(preset="tiny", batches=[1, 2], prompt=4, decode_steps=2, repeats=1,
                     memory_preset="tiny", memory_vocab=64, memory_tokens=[32], memory_repeats=1)
    device = torch.device("cpu")
    decode = decode_table(s, device, progress=lambda *a: None)
    assert {(r["dtype"], r["batch"]) for r in decode["rows"]} == {
        (d, b) for d in ("float32", "bfloat16", "int8") for b in (1, 2)}
    assert decode["bandwidth_bytes_per_s"] > 1e8
    sizes = {r["dtype"]: r["weight_bytes"] for r in decode["rows"]}
    assert sizes["int8"] < sizes["bfloat16"] < sizes["float32"] == decode["float32_weight_bytes"]
    assert all(r["tokens_per_s"] > 0 and r["speedup_vs_float32"] > 0 for r in decode["rows"])
    memory = memory_table(s, device, progress=lambda *a: None)
    names = [r["model"] for r in memory["rows"]]
    assert names == ["samout-openash", "samout-openash+recompute", "transformer"]
    plain, lean, _ = memory["rows"]
    # (at this size the step's peak is set by the optimizer and logits; tests/ops/test_recompute.py
    # checks that fewer bytes are kept)
    assert lean["peak_bytes"] <= plain["peak_bytes"]
    text = format_lowp({"header": {"machine": "m", "cpu_cores": 1, "torch": "t", "torch_threads": 1,
                                   "git_commit": "c", "command": "x"},
                        "settings": {"batches": s.batches, "dtypes": s.dtypes}, "decode": decode,
                        "memory": memory})
    assert "float32 ceiling at batch 1" in text and "recompute" in text
