"""ONNX export: the model on its export path, graphs vs PyTorch, int8, the CLI, the torch-free example."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from samout import SamOut, SamOutConfig  # noqa: E402
from samout.cli import main  # noqa: E402
from samout.config import MIXERS  # noqa: E402
from samout.export.onnx import (  # noqa: E402
    OnnxSamOut,
    check_onnx,
    export_onnx,
    greedy_tokens,
    torch_step,
)
from samout.ops.doubling_max import doubling_max, export_length_bound  # noqa: E402
from tests.tiny_run import PROMPT, make_run_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_PREFILL = 32
# The module, not the function of the same name that samout.ops exports.
doubling_module = importlib.import_module("samout.ops.doubling_max")


# -- the model on its export path ---------------------------------------------

@pytest.mark.parametrize("mixer", MIXERS)
def test_model_on_the_export_path_equals_the_model(mixer, seed, monkeypatch):
    # While exporting, the model takes its eager reference form (no Python loops over
    # time) and every cumulative max (over time, and over heads in "dual") is the
    # doubling scan: outputs and states equal the reference model's, bit for bit.
    model = SamOut(SamOutConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, mixer=mixer))
    ids = torch.randint(0, 50, (2, 40))
    ref, ref_state = model.set_kernel("reference")(ids)
    model.set_kernel("fused")
    calls = []

    def spy(x, dim, max_len=None):
        calls.append(x.shape[dim])
        return doubling_max(x, dim, max_len)

    monkeypatch.setattr(doubling_module, "doubling_max", spy)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with export_length_bound(64):
        got, got_state = model(ids)
    assert 40 in calls  # the running max over time took the doubling scan
    assert torch.equal(got, ref) and got_state.equal(ref_state)


# -- export through the CLI ------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("run")
    torch.manual_seed(4321)
    make_run_dir(path, shakespeare_text)
    return path


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory, shakespeare_dir):
    out = tmp_path_factory.mktemp("onnx")
    text = shakespeare_dir / "sonnets_gut.txt"
    code = main(["export", str(run_dir), "--onnx", str(out), "--quantize", "int8",
                 "--max-prefill-len", str(MAX_PREFILL), "--text", str(text), "--text-tokens", "300"])
    assert code == 0
    return out


def test_export_writes_the_graphs_and_a_report(exported, capsys):
    names = {p.name for p in exported.iterdir()}
    assert {"decode.onnx", "prefill.onnx", "decode.int8.onnx", "prefill.int8.onnx", "samout_onnx.json",
            "tokenizer.json", "export_report.json"} <= names
    report = json.loads((exported / "export_report.json").read_text())
    assert report["checks"]["prefill_max_abs_diff"] < 1e-4
    assert report["checks"]["greedy_steps_equal"] == 64
    int8 = report["int8"]
    for name in ("decode", "prefill"):
        assert int8["sizes"][f"{name}.int8.onnx"] < 0.6 * (exported / f"{name}.onnx").stat().st_size
    assert int8["perplexity_tokens"] == 299 and np.isfinite(int8["perplexity_candidate"])
    manifest = json.loads((exported / "samout_onnx.json").read_text())
    assert manifest["state_inputs"][0] == "state.layers.0.running_max"
    assert manifest["state_outputs"][-1] == "new_state.layers.1.running_max"


def test_onnx_logits_within_1e4_and_64_greedy_steps(run_dir, exported, seed):
    model = SamOut.from_pretrained(run_dir).eval()
    onnx_model = OnnxSamOut(exported)
    checks = check_onnx(model, onnx_model, steps=64, seed=seed)
    assert checks["prefill_max_abs_diff"] < 1e-4 and checks["decode_max_abs_diff"] < 1e-4
    assert checks["state_max_abs_diff"] < 1e-4
    assert checks["greedy_equal"], checks


@pytest.mark.parametrize("length", [1, 2, MAX_PREFILL, MAX_PREFILL + 1, 3 * MAX_PREFILL + 5])
def test_prefill_any_length_in_chunks_matches_pytorch(run_dir, exported, length, seed):
    # Lengths 1 (decode graph), 2 and MAX_PREFILL (prefill bounds), longer (chunks).
    model = SamOut.from_pretrained(run_dir).eval()
    onnx_model = OnnxSamOut(exported)
    ids = torch.randint(0, model.config.vocab_size, (3, length))
    want, want_state = torch_step(model)(ids.numpy(), None)
    got, got_state = onnx_model(ids.numpy())
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
    assert max(np.abs(a - b).max() for a, b in zip(got_state, want_state)) < 1e-4


def test_int8_graphs_run_and_stay_close_in_the_top_token(exported, seed):
    fp32 = OnnxSamOut(exported)
    int8 = OnnxSamOut(exported, "decode.int8.onnx", "prefill.int8.onnx")
    ids = np.random.default_rng(seed).integers(0, fp32.manifest["vocab_size"], (2, 12))
    a, b = fp32(ids)[0], int8(ids)[0]
    assert a.shape == b.shape and np.isfinite(b).all()
    # Quantization changes logits (random weights amplify it); they must still correlate.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("mixer, decay", [(m, False) for m in MIXERS if m != "openash"]
                         + [("openash", True), ("dual", True)])
def test_every_mixer_exports(mixer, decay, tmp_path, seed):
    model = SamOut(SamOutConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, mixer=mixer,
                                max_decay=decay, max_decay_init=0.05)).eval()
    export_onnx(model, tmp_path, max_prefill_len=16, log=lambda _: None)
    checks = check_onnx(model, OnnxSamOut(tmp_path), steps=64, seed=seed, prompt_len=20)
    assert checks["prefill_max_abs_diff"] < 1e-4 and checks["greedy_equal"], checks


@pytest.mark.parametrize("variant", ["hybrid", "hybrid-swa"])
def test_hybrid_export_is_a_clear_error(variant, tmp_path):
    from samout.errors import SamoutError
    from tests.helpers import MODEL_VARIANTS

    model = SamOut(SamOutConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                                **MODEL_VARIANTS[variant]))
    with pytest.raises(SamoutError, match="ONNX export supports maxstate layers only: layer"):
        export_onnx(model, tmp_path / "o", log=lambda _: None)
    assert not (tmp_path / "o").exists()


# -- the torch-free example ------------------------------------------------------

def test_example_generates_with_onnxruntime_and_tokenizers_only(run_dir, exported):
    # torch is made unimportable inside the example's interpreter.
    code = (
        "import sys, runpy\n"
        "sys.modules['torch'] = None\n"
        f"sys.argv = ['onnx_generate.py', {str(exported)!r}, '--prompt', {PROMPT!r},"
        " '--max-new-tokens', '20', '--temperature', '0']\n"
        "try:\n"
        "    runpy.run_path('examples/onnx_generate.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert sys.modules['torch'] is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    ids = np.array([[1] + tokenizer.encode(PROMPT).ids])  # the example starts after <|endoftext|>
    tokens = greedy_tokens(torch_step(SamOut.from_pretrained(run_dir).eval()), ids, 20)[0].tolist()
    if 1 in tokens:
        tokens = tokens[: tokens.index(1)]
    assert done.stdout.rstrip("\n") == PROMPT + tokenizer.decode(tokens)


# -- errors ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--max-prefill-len", "1"], "max_prefill_len must be an integer >= 2"),
    (["--check-steps", "0"], "--check-steps must be at least 1"),
    (["--text", "/nonexistent/text.txt"], "--text file not found"),
])
def test_bad_options_give_one_line_errors(run_dir, tmp_path, capsys, extra, message):
    assert main(["export", str(run_dir), "--onnx", str(tmp_path / "o"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_text_without_a_tokenizer_is_a_clear_error(tmp_path, capsys, shakespeare_dir):
    SamOut(SamOutConfig.from_preset("tiny")).save_pretrained(tmp_path / "run")  # no tokenizer.json
    code = main(["export", str(tmp_path / "run"), "--onnx", str(tmp_path / "o"), "--quantize", "int8",
                 "--text", str(shakespeare_dir / "sonnets_gut.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "needs a tokenizer" in err[0]
    assert not (tmp_path / "o").exists()  # refused before any work


def test_missing_run_dir_exits_1_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "samout", "export", str(tmp_path / "nope"), "--onnx",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "run directory not found" in done.stderr


def test_export_falls_back_to_the_newest_intact_checkpoint_like_generate(tmp_path, trained_run, capsys):
    """A crash between the renames of a run's top-level files: export, like generate, takes the
    newest checkpoint whose files verify (with a warning) instead of refusing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copy(run / "checkpoints" / "step-000002" / "model.safetensors", run / "model.safetensors")
    assert main(["export", str(run), "--onnx", str(tmp_path / "o"), "--check-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "loading" in err and "step-000004" in err
    assert (tmp_path / "o" / "decode.onnx").is_file() and (tmp_path / "o" / "tokenizer.json").is_file()
