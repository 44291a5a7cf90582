"""samout.run_dir: file permissions, loading with fallback, inference that never touches the
training code or the optimizer state, and device errors that are not called corruption."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samout import SamOut, SamOutConfig
from samout.errors import SamoutError
from samout.run_dir import (
    CHECKSUMS_NAME,
    CONFIG_NAME,
    TOKENIZER_NAME,
    TRAIN_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    list_checkpoints,
    load_model,
    load_run,
    newest_intact_checkpoint,
    read_train_config,
)

ROOT = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one after it."""
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a.txt", "x")
    SamOut(SamOutConfig.from_preset("tiny")).save_pretrained(tmp_path / "model")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any other file gets
    assert mode(plain) == 0o666 & ~mask
    for path in (tmp_path / "a.txt", tmp_path / "model" / CONFIG_NAME, tmp_path / "model" / WEIGHTS_NAME):
        assert mode(path) == 0o666 & ~mask, path


def test_a_trained_run_is_readable_by_others(trained_run):
    """The session's run was written under the default umask of the test process."""
    current = os.umask(0)
    os.umask(current)
    files = [trained_run / n for n in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, CHECKSUMS_NAME,
                                       TRAIN_CONFIG_NAME)]
    files += [p for ckpt in list_checkpoints(trained_run) for p in ckpt.iterdir()]
    for path in files:
        assert mode(path) == 0o666 & ~current, path


def test_load_model_falls_back_to_the_newest_intact_checkpoint(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    older = run / "checkpoints" / "step-000002" / WEIGHTS_NAME
    shutil.copy(older, run / WEIGHTS_NAME)  # a top-level set from two saves
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_model(run, fallback=False)
    model = load_model(run)
    assert "step-000004" in capsys.readouterr().err
    want = load_model(run / "checkpoints" / "step-000004")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    # A damaged training state does not stop inference: only model files are checked.
    state = run / "checkpoints" / "step-000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert newest_intact_checkpoint(run).name == "step-000004"


def test_no_intact_model_anywhere_is_the_top_level_error(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for path in [run, *list_checkpoints(run)]:
        (path / WEIGHTS_NAME).write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=str(run / WEIGHTS_NAME)):
        load_run(run)


def test_read_train_config(tmp_path, trained_run):
    assert read_train_config(trained_run)["seq_len"] == 32
    assert read_train_config(tmp_path) == {}
    (tmp_path / TRAIN_CONFIG_NAME).write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_train_config(tmp_path)


def test_inference_never_imports_training_nor_reads_optimizer_state(trained_run):
    code = f"""
import sys, torch
real_load = torch.load
def no_load(*args, **kwargs):
    raise AssertionError(f"torch.load called: {{args[:1]}}")
torch.load = no_load  # training_state.pt is the only file read with torch.load
from samout.generation import generate, load_for_generation
model, tok = load_for_generation({str(trained_run)!r})
text = generate(model, tok, "To", max_new_tokens=5, seed=0)
from samout.run_dir import load_run
load_run({str(trained_run)!r})
assert "samout.training" not in sys.modules, sorted(m for m in sys.modules if m.startswith("samout.training"))
print("ok", len(text))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_an_unavailable_device_is_not_called_corruption(trained_run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for load in (load_model, load_run):
        with pytest.raises(SamoutError, match="CUDA is not available") as err:
            load(trained_run, device="cuda")
        assert "corrupt" not in str(err.value)
    with pytest.raises(SamoutError, match="unknown device"):
        load_model(trained_run, device="gpu7")


def test_samout_load_is_the_one_loader(trained_run):
    import samout
    from samout.generation import load_for_generation

    model, tokenizer = samout.load(trained_run)
    weights_only = samout.load_model(trained_run)
    for other in (weights_only, load_run(trained_run)[0], load_for_generation(trained_run)[0]):
        assert type(other) is type(model)
        pairs = zip(model.state_dict().values(), other.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs)
    assert tokenizer.get_vocab() == load_run(trained_run)[1].get_vocab()
    with pytest.raises(SamoutError, match="run directory not found"):
        samout.load(trained_run / "nowhere")


def test_a_checkpoint_writes_the_hugging_face_files_once_per_directory(tmp_path, monkeypatch):
    import samout.models.base as base
    from samout.run_dir import save_checkpoint
    from samout.tokenizer import train_tokenizer

    written = []
    real = base.write_hf_files
    monkeypatch.setattr(base, "write_hf_files", lambda d: written.append(Path(d).name) or real(d))
    tokenizer = tmp_path / TOKENIZER_NAME
    train_tokenizer(["to be or not to be"] * 20, vocab_size=300).save(str(tokenizer))
    model = SamOut(SamOutConfig.from_preset("tiny", vocab_size=300))
    save_checkpoint(tmp_path / "run", 1, model, tokenizer, {"step": 1}, keep=2)
    assert written == [".tmp-step-000001", "run"]
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()  # the tokenizer's entries too


def test_private_atomic_write_is_owner_only_and_never_creates_the_directory(tmp_path):
    atomic_write(tmp_path / "state", b"x", private=True)
    assert (tmp_path / "state").read_bytes() == b"x"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "gone" / "state", b"x", private=True)
    assert not (tmp_path / "gone").exists()
    atomic_write(tmp_path / "made" / "file", b"y")  # the default creates it
    assert (tmp_path / "made" / "file").read_bytes() == b"y"
