from __future__ import annotations

import pytest

from tests.serve.serve_fixtures import make_models, save_transformer_run


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory):
    """(samout, transformer, tokenizer, samout_run_dir, transformer_run_dir): tiny, random, decisive."""
    root = tmp_path_factory.mktemp("serve")
    model, transformer, tokenizer = make_models(root / "samout-run")
    save_transformer_run(root / "transformer-run", transformer, tokenizer)
    return model, transformer, tokenizer, root / "samout-run", root / "transformer-run"
