import json

import pytest
import torch

from samout.bench.recall import IGNORE, RecallSettings, make_mqar, parse_tasks, run_recall
from samout.errors import SamoutError


@pytest.mark.parametrize("seq_len, pairs, vocab", [(16, 4, 21), (64, 8, 128), (33, 5, 12)])
def test_generator_queries_known_keys_and_targets_their_values(seed, seq_len, pairs, vocab):
    g = torch.Generator().manual_seed(seed)
    inputs, targets = make_mqar(50, seq_len, pairs, vocab, g)
    assert inputs.shape == targets.shape == (50, seq_len)
    num_keys = (vocab - 1) // 2
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k <= num_keys for k in keys)
        assert all(num_keys < v < vocab for v in values)
        assert all(t == IGNORE for t in y[: 2 * pairs])  # no loss on the pairs themselves
        queries = [(i, x[i], y[i]) for i in range(2 * pairs, seq_len) if y[i] != IGNORE]
        assert sorted(k for _, k, _ in queries) == sorted(keys)  # every key queried once
        lookup = dict(zip(keys, values))
        assert all(lookup[k] == t for _, k, t in queries)
        # Outside the queries the query region is filler, and never two queries in a row.
        query_positions = {i for i, _, _ in queries}
        assert all(x[i] == 0 for i in range(2 * pairs, seq_len) if i not in query_positions)
        assert all(i + 1 not in query_positions for i in query_positions)


def test_query_order_and_positions_vary(seed):
    g = torch.Generator().manual_seed(seed)
    inputs, _ = make_mqar(200, 64, 8, 128, g)
    assert len({tuple(row) for row in (inputs[:, 16:] != 0).int().tolist()}) > 100


@pytest.mark.parametrize("args, message", [
    ((1, 8, 4, 128), "too short for 4 pairs"),
    ((1, 64, 40, 64), "need vocab_size >= 81"),
])
def test_impossible_tasks_are_clear_errors(args, message):
    with pytest.raises(SamoutError, match=message):
        make_mqar(*args)


def test_parse_tasks():
    assert parse_tasks("64x4, 128X16") == [(64, 4), (128, 16)]
    with pytest.raises(SamoutError, match="LENGTHxPAIRS"):
        parse_tasks("64-4")


def test_tiny_run_writes_results(tmp_path):
    s = RecallSettings(
        preset="tiny", overrides={"vocab_size": 32, "hidden_size": 32, "num_layers": 1, "num_heads": 2},
        mixers=["gen4"], tasks=[(16, 2), (24, 4)], steps=3, batch_size=4, eval_examples=10,
    )
    results = run_recall(s, tmp_path, progress=False)
    data = json.loads((tmp_path / "recall.json").read_text())
    assert data["header"]["torch"] == torch.__version__
    assert [(r["model"], r["seq_len"], r["num_pairs"]) for r in data["runs"]] == [
        ("samout-gen4", 16, 2), ("transformer", 16, 2), ("samout-gen4", 24, 4), ("transformer", 24, 4)]
    assert all(0 <= r["accuracy"] <= 1 and r["queries"] == 10 * r["num_pairs"] for r in data["runs"])
    assert (tmp_path / results["plots"][0]).read_bytes()[:4] == b"\x89PNG"


def test_variants_run_and_are_parameter_matched(tmp_path):
    # Issue 14's variants beside the Transformer; the hybrids need 4 layers.
    s = RecallSettings(
        preset="tiny", overrides={"vocab_size": 32, "hidden_size": 32, "num_layers": 4, "num_heads": 2},
        mixers=[], variants=["samout", "samout-decay", "hybrid", "hybrid-swa"], window=8,
        tasks=[(16, 2)], steps=2, batch_size=4, eval_examples=8,
    )
    results = run_recall(s, tmp_path, progress=False)
    models = results["models"]
    assert list(models) == ["samout", "samout-decay", "hybrid", "hybrid-swa", "transformer"]
    assert models["hybrid"]["config"]["layer_types"] == ["maxstate", "attention", "maxstate", "maxstate"]
    assert models["hybrid"]["config"]["max_decay"] is True
    assert models["hybrid-swa"]["config"]["attention_window"] == 8
    assert models["samout-decay"]["config"]["max_decay"] is True
    base = models["samout"]["non_embedding_parameters"]
    for name, m in models.items():  # all within 2% of the base SamOut
        assert abs(m["non_embedding_parameters"] - base) <= 0.02 * base, name
    assert all(r["seconds"] > 0 for r in results["runs"])


def test_hybrid_variant_needs_four_layers(tmp_path):
    s = RecallSettings(preset="tiny", overrides={"vocab_size": 32, "hidden_size": 32, "num_layers": 2,
                                                 "num_heads": 2}, mixers=[], variants=["hybrid"],
                       tasks=[(16, 2)], steps=1, batch_size=2, eval_examples=2)
    with pytest.raises(SamoutError, match="needs --num-layers >= 4"):
        run_recall(s, tmp_path, progress=False)
    with pytest.raises(SamoutError, match="unknown variant 'mamba'"):
        run_recall(RecallSettings(variants=["mamba"], mixers=[]), tmp_path, progress=False)
