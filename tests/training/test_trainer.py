"""Training: run directory layout, exact resume, stopping rules, config files, schedule."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from samout.errors import SamoutError
from samout.models import load_pretrained
from samout.run_dir import list_checkpoints, load_training_state
from samout.training.config import TrainConfig, load_config_file, parse_duration
from samout.training.schedule import Schedule, lr_multiplier
from samout.training.setup import train
from tests.fixtures_pipeline import TINY_TRAIN


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_run_dir_layout(trained_run, prepared_data):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "log.jsonl", "loss.png",
                 "train_config.json"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in list_checkpoints(trained_run)] == ["step-000002", "step-000004"]
    state = load_training_state(trained_run / "checkpoints" / "step-000004")
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 4 * 32
    assert state["data_position"] == {"next_step": 4, "seed": 0, "world_size": 1}
    assert {"optimizer", "scheduler", "rng", "train_config"} <= state.keys()
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    model = load_pretrained(trained_run)
    assert model.config.vocab_size == 400 and model.config.padding_idx == 0  # vocab from the tokenizer
    top = load_file(trained_run / "model.safetensors")
    last = load_file(trained_run / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.equal(top[k], last[k]) for k in top)
    log = read_log(trained_run)
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["val_bpb"] > 0 for r in evals)


def test_resume_is_exact(tmp_path, prepared_data):
    """Killed after the step-3 checkpoint, then resumed: the same weights bit for bit and
    the same losses as the uninterrupted 6-step run."""
    settings = dict(TINY_TRAIN, max_steps=6, save_every=3, eval_every=3, warmup_steps=2)
    straight = tmp_path / "straight"
    train(prepared_data, straight, preset="tiny", overrides=settings, quiet=True)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000006")  # as if killed before saving step 6
    for name in ("model.safetensors", "loss.png"):
        (crashed / name).unlink()
    with (crashed / "log.jsonl").open("a") as f:
        f.write('{"type": "train", "step": 7, "lo')  # a line cut short by the kill
    result = train(prepared_data, crashed, resume=True, quiet=True)
    assert result["step"] == 6
    a = load_file(straight / "model.safetensors")
    b = load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(run)]  # noqa: E731
    assert losses(straight) == losses(crashed)


def test_resume_continues_to_a_larger_max_steps(tmp_path, prepared_data):
    run = tmp_path / "run"
    train(prepared_data, run, preset="tiny", overrides=dict(TINY_TRAIN, max_steps=2), quiet=True)
    result = train(prepared_data, run, overrides={"max_steps": 5}, resume=True, quiet=True)
    assert result["step"] == 5 and result["tokens"] == 5 * 4 * 32
    assert [r["step"] for r in read_log(run) if r["type"] == "train"] == [1, 2, 3, 4, 5]
    assert list_checkpoints(run)[-1].name == "step-000005"


def test_resume_without_checkpoint_and_refuse_overwrite(tmp_path, prepared_data, trained_run):
    with pytest.raises(SamoutError, match="no checkpoint in .* to resume"):
        train(prepared_data, tmp_path / "empty", resume=True, quiet=True)
    with pytest.raises(SamoutError, match="already holds a run"):
        train(prepared_data, trained_run, preset="tiny", overrides=TINY_TRAIN, quiet=True)


def test_stops_by_tokens_and_time(tmp_path, prepared_data):
    tokens_per_step = 4 * 32
    result = train(prepared_data, tmp_path / "tok", preset="tiny",
                   overrides=dict(TINY_TRAIN, max_steps=100, max_tokens=3 * tokens_per_step), quiet=True)
    assert result["step"] == 3 and "max_tokens" in result["stop_reason"]
    result = train(prepared_data, tmp_path / "time", preset="tiny",
                   overrides=dict(TINY_TRAIN, max_steps=10_000, max_time=0.5), quiet=True)
    assert result["step"] < 10_000 and "max_time" in result["stop_reason"]


def test_config_file_with_model_and_training_fields(tmp_path, prepared_data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny\nhidden_size: 32\nnum_heads: 2\nmixer: gen4\n"
                   "max_steps: 2\nseq_len: 16\nbatch_size: 2\nlr: 0.001\ngrad_accum: 2\n")
    model, training = load_config_file(cfg)
    assert model == {"preset": "tiny", "hidden_size": 32, "num_heads": 2, "mixer": "gen4"}
    assert training["grad_accum"] == 2
    run = tmp_path / "run"
    # A command-line override wins over the file.
    train(prepared_data, run, config_file=cfg, overrides={"max_steps": 3, "eval_windows": 2}, quiet=True)
    m = load_pretrained(run)
    c = m.config
    assert (c.hidden_size, c.num_heads, c.mixer, c.vocab_size) == (32, 2, "gen4", 400)
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_steps"] == 3 and saved["grad_accum"] == 2 and saved["lr"] == 0.001


def test_bad_config_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1\n")
    with pytest.raises(SamoutError, match="not valid YAML"):
        load_config_file(bad)
    with pytest.raises(SamoutError, match="unknown training setting"):
        TrainConfig.from_dict({"max_stepz": 3})
    with pytest.raises(SamoutError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    assert parse_duration("4m") == 240 and parse_duration("1.5h") == 5400 and parse_duration("30") == 30


def test_schedule_warmup_then_cosine():
    m = [lr_multiplier(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert all(a < b for a, b in zip(m[:10], m[1:11]))  # rising during warmup
    assert m[10] == pytest.approx(1.0) and m[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # then decaying
    assert m[60] == pytest.approx(0.55)
    # A token or time budget moves the decay too: halfway through the budget is the middle.
    assert lr_multiplier(20, 10, 10_000, 0.1, progress=0.5) == pytest.approx(0.55)
    cfg = TrainConfig(max_steps=10_000, warmup_steps=0, max_time=100.0, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert Schedule(opt, cfg).set_lr(step=5, elapsed=100.0) == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_bfloat16_and_grad_accum_train(tmp_path, prepared_data):
    result = train(prepared_data, tmp_path / "bf16", preset="tiny",
                   overrides=dict(TINY_TRAIN, max_steps=2, dtype="bfloat16", grad_accum=2), quiet=True)
    assert result["step"] == 2 and result["tokens"] == 2 * 2 * 4 * 32
    assert torch.isfinite(torch.tensor(result["val_loss"]))


def test_default_warmup_is_a_fraction_of_the_run():
    from samout.training.schedule import warmup_steps

    def lr(cfg, step, elapsed=0.0, tokens=0):
        return Schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg).set_lr(
            step, tokens, elapsed)

    assert warmup_steps(TrainConfig()) == 100  # 5% of 2000 steps
    assert warmup_steps(TrainConfig(max_steps=40)) == 2
    assert warmup_steps(TrainConfig(max_steps=40, warmup_steps=7)) == 7  # given: used as is
    # A 3-minute run that makes only a few slow steps: warm after 5% of its time (9 s), then decaying.
    cfg = TrainConfig(lr=1.0, max_time=180.0)
    assert lr(cfg, step=0, elapsed=0.0) < 0.05
    assert lr(cfg, step=1, elapsed=4.5) == pytest.approx(0.5)
    peak = lr(cfg, step=2, elapsed=9.0)
    assert peak == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 180)))
    assert peak > 0.97 and lr(cfg, step=20, elapsed=180.0) == pytest.approx(0.1)
    # A token budget likewise.
    cfg = TrainConfig(lr=1.0, max_tokens=100_000)
    assert lr(cfg, step=3, tokens=5_000) > 0.99
    # An explicit --warmup-steps keeps the step rule whatever the clock says.
    assert lr(TrainConfig(lr=1.0, max_time=180.0, warmup_steps=100), step=3, elapsed=100.0) \
        == pytest.approx(4 / 101)
