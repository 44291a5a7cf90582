import json

import pytest
import torch

from samout.bench.common import model_specs, peak_allocated_bytes
from samout.bench.speed import SpeedSettings, run_speed
from samout.config import MIXERS, SamOutConfig
from samout.models.transformer_config import MATCH_TOLERANCE

TINY = dict(
    preset="tiny",
    overrides={"vocab_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 2},
    mixers=list(MIXERS),
    lengths=[16, 32],
    tokens_per_step=64,
    contexts=[8, 40],
    decode_steps=2,
    prefill_chunk=16,
    repeats=2,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    results = run_speed(SpeedSettings(**TINY), out, progress=False)
    return out, results


def test_writes_json_and_plots(tiny_run):
    out, results = tiny_run
    on_disk = json.loads((out / "speed.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("machine", "cpu_cores", "torch_threads", "torch", "git_commit", "command", "date_utc"):
        assert on_disk["header"][key] not in (None, ""), key
    assert on_disk["header"]["torch"] == torch.__version__
    names = [f"samout-{m}" for m in MIXERS] + ["transformer"]
    assert list(on_disk["models"]) == names
    assert len(on_disk["train"]) == len(names) * 2 and len(on_disk["decode"]) == len(names) * 2
    for row in on_disk["train"]:
        assert row["batch"] == 64 // row["length"] and len(row["seconds"]) == 2
        assert row["tokens_per_s"] > 0 and row["peak_bytes"] > row["resident_bytes"] > 0
    for row in on_disk["decode"]:
        assert len(row["seconds"]) == 2 and row["median_latency_ms"] > 0 and row["step_bytes"] > 0
    for table in on_disk["ratios"].values():
        assert set(table) == set(names[:-1])
        assert all(v > 0 for per_model in table.values() for v in per_model.values())
    assert len(on_disk["plots"]) == 4
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in on_disk["plots"])


def test_decode_state_is_flat_for_samout_and_grows_for_the_transformer(tiny_run):
    _, results = tiny_run
    state = {(r["model"], r["context"]): r["state_bytes"] for r in results["decode"]}
    for m in MIXERS:
        assert state[(f"samout-{m}", 8)] == state[(f"samout-{m}", 40)] == 1 * 2 * 16 * 4  # layers*H*dh*4
    kv_per_token = 1 * 2 * 2 * 16 * 4  # layers * (key, value) * heads * dh * float32
    assert state[("transformer", 8)] == 8 * kv_per_token
    assert state[("transformer", 40)] == 40 * kv_per_token
    ratios = results["ratios"]["decode_state_bytes"]["samout-openash"]
    assert ratios["40"] < ratios["8"]


def test_matched_pair_is_within_two_percent(tiny_run):
    _, results = tiny_run
    models = results["models"]
    target = models[results["matched_to"]]["non_embedding_parameters"]
    assert abs(models["transformer"]["non_embedding_parameters"] - target) <= MATCH_TOLERANCE * target


def test_model_specs_use_the_user_classes_configs():
    base = SamOutConfig.from_preset("seed-003", vocab_size=8192)
    specs = model_specs(base, ["gen4", "openash"], "gen4")
    assert specs["samout-gen4"] == base
    assert specs["transformer"].hidden_size == 512 and specs["transformer"].num_layers == 8


def test_peak_allocated_bytes_counts_what_is_allocated():
    mb = 2**20
    keep = []

    def work():
        a = torch.ones(mb // 4)            # 1 MiB
        b = torch.ones(2 * mb // 4)        # 2 MiB, both alive: 3 MiB
        del a, b
        keep.append(torch.ones(mb // 4))   # 1 MiB that stays

    peak = peak_allocated_bytes(work, torch.device("cpu"))
    assert 3 * mb <= peak < 3 * mb + 64 * 1024


def test_seed_004_baseline_and_the_concatenating_kv_reference(tmp_path):
    """--baseline seed-004 runs today's faithful baseline, labelled so; --kv-reference adds
    the Transformer decoding with the old concatenating cache, in the same run."""
    from samout.bench.speed import KV_REFERENCE, format_speed

    settings = SpeedSettings(**{**TINY, "mixers": ["openash"], "lengths": [16], "contexts": [8],
                                "baseline": "seed-004", "kv_reference": True})
    results = run_speed(settings, tmp_path, progress=False)
    assert results["baseline"] == "seed-004 baseline"
    assert results["models"]["transformer"]["config"]["positional"] == "sinusoidal"
    assert [r["model"] for r in results["train"]] == ["samout-openash", "transformer"]
    assert [r["model"] for r in results["decode"]] == ["samout-openash", "transformer", KV_REFERENCE]
    assert results["ratios"]["decode_latency"][KV_REFERENCE]["8"] > 0
    assert "seed-004 baseline" in format_speed(results)
    default = model_specs(SamOutConfig.from_preset("tiny"), ["openash"], "openash")["transformer"]
    assert default.style == "modern"
