"""Shared fixtures. Real text comes from ../shared/corpora (beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CORPORA = Path(os.environ.get("SAMOUT_CORPORA", ROOT.parent / "shared" / "corpora"))

# Keep the suite predictable on small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    path = CORPORA / "shakespeare"
    if not path.is_dir():
        pytest.fail(f"test corpus not found at {path}; set SAMOUT_CORPORA to shared/corpora")
    return path


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_dir: Path) -> str:
    return (shakespeare_dir / "sonnets_gut.txt").read_text(encoding="utf-8")


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed on failure, so inputs are never the same twice."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"torch seed: {s}")
    return s

# Prepared data and a briefly trained run, shared by the pipeline tests.
from tests.fixtures_pipeline import play_files, prepared_data, trained_run  # noqa: E402, F401
