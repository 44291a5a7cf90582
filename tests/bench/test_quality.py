import json

from samout.bench.quality import QualitySettings, corpus_files, run_quality
from samout.cli import main
from samout.models import load_pretrained


def test_tiny_quality_run(tmp_path, shakespeare_dir):
    corpus = tmp_path / "plays"
    corpus.mkdir()
    plays = sorted(p for p in shakespeare_dir.glob("*_gut.txt"))[:20]  # a split needs 20 documents
    for play in plays:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[5000:8000])
    s = QualitySettings(corpus=str(corpus), preset="tiny", mixers=["gen3"], vocab_size=300, val_fraction=0.1,
                        seq_len=16, batch_size=2, max_steps=4, warmup_steps=1, eval_every=2, eval_windows=2,
                        final_eval_windows=2)
    out = tmp_path / "out"
    results = run_quality(s, out, progress=False)
    data = json.loads((out / "quality.json").read_text())
    assert list(data["models"]) == ["samout-gen3", "transformer", "transformer+ntk"]
    # The validation plays written down are the ones prepare() held out.
    meta = json.loads((out / "quality-work" / "data" / "meta.json").read_text())
    assert len(data["split"]["validation_files"]) == meta["splits"]["val"]["documents"] == 2
    assert data["split"]["validation_files"][0] in {p.name for p in corpus.iterdir()}
    for m in (m for name, m in data["models"].items() if "+" not in name):  # +ntk: evaluated only
        assert [c["step"] for c in m["curve"]] == [2, 4] and all(c["elapsed"] > 0 for c in m["curve"])
        assert m["tokens"] == 4 * 2 * 16
        assert [v["seq_len"] for v in m["contexts"].values()] == [16, 32, 64]
        assert all(v["bits_per_byte"] > 0 for v in m["contexts"].values())
    assert type(load_pretrained(out / "quality-work" / "runs" / "transformer")).__name__ == "Transformer"
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in results["plots"])


def test_quality_needs_a_corpus_of_whole_documents(tmp_path, capsys):
    assert main(["bench", "quality", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--corpus" in err and len(err.strip().splitlines()) == 1
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("some text\n" * 50)
    assert main(["bench", "quality", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "needs at least 20 documents" in capsys.readouterr().err


def test_unknown_names_fail_before_any_data_is_prepared(tmp_path, capsys):
    for flag, value, message in (("--baseline", "gpt2", "unknown baseline 'gpt2'"),
                                 ("--rope-scaling", "foo", "unknown RoPE scaling 'foo'"),
                                 ("--variants", "mamba", "unknown variant 'mamba'")):
        out = tmp_path / flag.strip("-")
        assert main(["bench", "quality", "--corpus", "shakespeare", flag, value, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()  # no tokenizer trained, no data written


def test_quality_runs_the_variants(tmp_path, shakespeare_dir):
    corpus = tmp_path / "plays"
    corpus.mkdir()
    for play in sorted(shakespeare_dir.glob("*_gut.txt"))[:20]:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[5000:7000])
    s = QualitySettings(corpus=str(corpus), preset="tiny", overrides={"num_layers": 4}, mixers=[],
                        variants=["samout-decay", "hybrid-swa"], window=4, vocab_size=300, seq_len=8,
                        batch_size=2, max_steps=2, warmup_steps=1, eval_every=2, eval_windows=1,
                        final_eval_windows=1, context_multiples=[1, 4])
    data = run_quality(s, tmp_path / "out", progress=False)
    assert list(data["models"]) == ["samout-decay", "hybrid-swa", "transformer", "transformer+ntk"]
    swa = load_pretrained(tmp_path / "out" / "quality-work" / "runs" / "hybrid-swa")
    assert swa.config.attention_window == 4 and swa.config.num_layers == 4
    assert swa.config.resolved_layer_types == ["maxstate", "attention", "maxstate", "maxstate"]
    assert [v["seq_len"] for v in data["models"]["hybrid-swa"]["contexts"].values()] == [8, 32]


def test_builtin_shakespeare_is_a_corpus_of_whole_works(tmp_path, shakespeare_dir, monkeypatch):
    assert corpus_files("shakespeare") == ["shakespeare"]
    # the same name as a directory (here: the works written out) means the directory
    monkeypatch.chdir(shakespeare_dir.parent)
    assert len(corpus_files("shakespeare")) == 38


def test_quality_at_equal_wall_time(tmp_path, shakespeare_dir):
    """--max-time: every model trains for the same time (the step cap far away), so faster
    models see more tokens."""
    corpus = tmp_path / "plays"
    corpus.mkdir()
    for play in sorted(shakespeare_dir.glob("*_gut.txt"))[:20]:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[5000:7000])
    s = QualitySettings(corpus=str(corpus), preset="tiny", mixers=["openash"], vocab_size=300, seq_len=8,
                        batch_size=2, max_steps=100_000, max_time=1.0, warmup_steps=1, eval_every=5,
                        eval_windows=1, final_eval_windows=1, context_multiples=[1])
    data = run_quality(s, tmp_path / "out", progress=False)
    for m in (m for name, m in data["models"].items() if "+" not in name):
        assert 1.0 <= m["train_seconds"] < 5.0
        assert 0 < m["tokens"] < 100_000 * 2 * 8
    assert data["train_config"]["max_time"] == 1.0


def test_quality_baselines_rope_scaling_and_seeds(tmp_path, shakespeare_dir):
    """Both baseline styles, the rotary one also evaluated with RoPE scaling, two seeds:
    mean and spread reported, every seed's figures kept."""
    from samout.bench.quality import format_quality

    corpus = tmp_path / "plays"
    corpus.mkdir()
    for play in sorted(shakespeare_dir.glob("*_gut.txt"))[:20]:
        (corpus / play.name).write_text(play.read_text(encoding="utf-8")[5000:7000])
    s = QualitySettings(corpus=str(corpus), preset="tiny", mixers=["openash"], vocab_size=300, seq_len=8,
                        batch_size=2, max_steps=2, warmup_steps=1, eval_every=2, eval_windows=1,
                        final_eval_windows=1, context_multiples=[1, 4], baselines=["modern", "seed-004"],
                        rope_scaling=["ntk", "yarn"], seeds=[0, 1])
    data = run_quality(s, tmp_path / "out", progress=False)
    assert list(data["models"]) == ["samout-openash", "transformer", "transformer+ntk", "transformer+yarn",
                                    "transformer-seed-004"]
    runs = tmp_path / "out" / "quality-work" / "runs"
    assert load_pretrained(runs / "transformer" / "seed-1").config.style == "modern"
    assert load_pretrained(runs / "transformer-seed-004" / "seed-0").config.style == "seed-004"
    tf, ntk = data["models"]["transformer"], data["models"]["transformer+ntk"]
    assert ntk["contexts"]["1"]["bits_per_byte"] == tf["contexts"]["1"]["bits_per_byte"]  # factor 1
    assert ntk["contexts"]["4"]["bits_per_byte"] != tf["contexts"]["4"]["bits_per_byte"]
    assert set(tf["seeds"]) == {"0", "1"} and "curve" not in ntk
    spread = tf["contexts"]["4"]["bits_per_byte_spread"]
    assert spread["n"] == 2 and spread["min"] <= spread["mean"] <= spread["max"]
    text = format_quality(data)
    assert "transformer-seed-004: the seed-004 baseline" in text and " ± " in text
