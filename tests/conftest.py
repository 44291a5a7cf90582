"""Shared fixtures. Real text is the Shakespeare shipped inside the package
(samout.data.sources.shakespeare_works), so the suite needs nothing outside the repository.

Randomness is a function of the test's node id: before every fixture and before every test
body, Python's, NumPy's and torch's global generators are seeded from the node id (and the
fixture's name), so a failure reproduces with the same command, whichever xdist worker runs
the test and whatever ran before it. SAMOUT_TEST_SEED=N mixes N into every seed, to explore
other draws. Hypothesis is derandomized with no example database under CI=true, and stays
random locally.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import random
from pathlib import Path

# The Triton kernels are tested on CPU in Triton's interpreter, which takes effect only if
# this is set before triton is first imported (by any test module, in any xdist worker).
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from samout.data.sources import shakespeare_works  # noqa: E402

# Keep the suite predictable on small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
HYPOTHESIS_PROFILE = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
settings.load_profile(HYPOTHESIS_PROFILE)

SALT = os.environ.get("SAMOUT_TEST_SEED", "")


def node_seed(*parts: str) -> int:
    """A 32-bit seed from the test's node id (and a fixture name): the same on every run."""
    key = "\0".join((*parts, SALT)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    # A module- or session-scoped fixture is set up by whichever test needs it first:
    # seeding from its own name and scope keeps what it builds independent of that order.
    seed_everything(node_seed(request.node.nodeid, fixturedef.argname))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    seed_everything(node_seed(item.nodeid))
    return (yield)


def pytest_sessionstart(session) -> None:
    # Written even under -q (a report header is not), so every CI log names what it tested.
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller writes it once
    found = []
    for name in ("torch", "transformers", "tokenizers", "fastapi", "uvicorn", "pydantic", "lm_eval", "openai",
                 "onnxruntime", "hypothesis"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("versions: " + ", ".join(found))
        reporter.write_line(f"hypothesis profile: {HYPOTHESIS_PROFILE}; "
                            f"SAMOUT_TEST_SEED: {SALT or '(unset)'}")


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
def seed(request) -> int:
    """The test's own seed (from its node id; SAMOUT_TEST_SEED varies it), printed on failure."""
    s = node_seed(request.node.nodeid)
    torch.manual_seed(s)
    print(f"torch seed: {s} (SAMOUT_TEST_SEED={SALT or 'unset'})")
    return s

# Prepared data and a briefly trained run, shared by the pipeline tests.
from tests.fixtures_pipeline import play_files, prepared_data, trained_run  # noqa: E402, F401
