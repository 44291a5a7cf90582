"""Progress output of a training run when stdout/stderr are not a terminal."""

import samout.training.progress as progress
from samout.training.setup import train
from tests.fixtures_pipeline import TINY_TRAIN


def test_plain_progress_lines_without_a_terminal(tmp_path, prepared_data, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line per step instead of every 10 s
    train(prepared_data, tmp_path / "run", preset="tiny", overrides=dict(TINY_TRAIN, eval_every=100))
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("step ") and "/4" in line]
    assert [line.split(":")[0] for line in lines] == [f"step {i}/4" for i in range(1, 5)]
    assert all("loss" in line and "tok_s" in line and "eta" in line for line in lines)
    assert not any("\r" in line for line in out)  # no progress bar in a log file


def test_plain_progress_lines_are_spaced_in_time(tmp_path, prepared_data, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 600.0)
    train(prepared_data, tmp_path / "run", preset="tiny", overrides=dict(TINY_TRAIN, eval_every=100))
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("step ") and "/4" in line]
    assert len(lines) == 1 and lines[0].startswith("step 1/4")  # the first step, then every 600 s


def test_quiet_prints_no_progress(tmp_path, prepared_data, capsys):
    train(prepared_data, tmp_path / "run", preset="tiny", overrides=TINY_TRAIN, quiet=True)
    assert capsys.readouterr().out == ""
