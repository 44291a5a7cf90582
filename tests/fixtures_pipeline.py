"""Fixtures for the pipeline tests: a small prepared data set and a briefly trained run.

Imported by the conftest.py of the test directories that use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from samout.data.prepare import prepare
from samout.training.setup import train

PLAYS = ["lear_gut.txt", "othello_gut.txt", "julius_caesar_gut.txt"]
VOCAB = 400

TINY_TRAIN = dict(max_steps=4, seq_len=32, batch_size=4, warmup_steps=2, eval_every=2, eval_windows=4,
                  save_every=2, log_every=1)


@pytest.fixture(scope="session")
def play_files(shakespeare_dir: Path) -> list[str]:
    files = [shakespeare_dir / name for name in PLAYS]
    for f in files:
        if not f.is_file():
            pytest.fail(f"test corpus file missing: {f}")
    return [str(f) for f in files]


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, play_files) -> Path:
    out = tmp_path_factory.mktemp("data") / "plays"
    prepare(play_files, out, vocab_size=VOCAB, quiet=True)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, prepared_data) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(prepared_data, run, preset="tiny", overrides=TINY_TRAIN, quiet=True)
    return run
