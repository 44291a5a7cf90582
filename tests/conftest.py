"""Shared fixtures. Real text is the Shakespeare shipped inside the package
(samout.data.sources.shakespeare_works), so the suite needs nothing outside the repository."""

from __future__ import annotations

import os
from pathlib import Path

# The Triton kernels are tested on CPU in Triton's interpreter, which takes effect only if
# this is set before triton is first imported (by any test module, in any xdist worker).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from samout.data.sources import shakespeare_works  # noqa: E402

# Keep the suite predictable on small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """The shipped works written out as files (one per work), for tests that need paths."""
    path = tmp_path_factory.mktemp("corpora") / "shakespeare"
    path.mkdir()
    for name, text in shakespeare_works().items():
        (path / name).write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return shakespeare_works()["sonnets_gut.txt"]


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed on failure, so inputs are never the same twice."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"torch seed: {s}")
    return s

# Prepared data and a briefly trained run, shared by the pipeline tests.
from tests.fixtures_pipeline import play_files, prepared_data, trained_run  # noqa: E402, F401
