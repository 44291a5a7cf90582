"""Checksummed checkpoints, fallback to the newest good one, a consistent top-level model,
and unwritable output (full disk, a path that cannot be a directory)."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import samout.run_dir as checkpointing
from samout.cli import main
from samout.errors import SamoutError
from samout.models import load_pretrained
from samout.remote_code import HF_FILES
from samout.run_dir import CheckpointError, find_resumable, list_checkpoints, verify_checksums
from samout.training.setup import train
from tests.commands.test_cli_errors import assert_one_line_error
from tests.fixtures_pipeline import TINY_TRAIN


def weights(directory):
    return load_file(directory / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def run_copy(tmp_path, trained_run):
    """A private copy of the session's trained run (checkpoints at steps 2 and 4)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_checkpoints_carry_checksums_of_every_file(trained_run):
    for ckpt in list_checkpoints(trained_run):
        listed = json.loads((ckpt / "checksums.json").read_text())["files"]
        # The Hugging Face files (auto_map, remote-code modules) are part of the model.
        assert set(listed) == {"config.json", "model.safetensors", "tokenizer.json", "training_state.pt",
                               *HF_FILES}
        assert verify_checksums(ckpt, required=True)
    top = json.loads((trained_run / "checksums.json").read_text())["files"]
    assert set(top) == {"config.json", "model.safetensors", "tokenizer.json", *HF_FILES}
    assert verify_checksums(trained_run)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_named_and_resume_falls_back(run_copy, prepared_data, damage, capsys):
    newest = run_copy / "checkpoints" / "step-000004"
    target = newest / ("training_state.pt" if damage == "flip" else "model.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        target.unlink()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(newest) if damage != "flip" else checkpointing.verify_checkpoint(newest)
    assert str(target) in str(err.value) and "\n" not in str(err.value)

    ckpt, state, skipped = find_resumable(run_copy)
    assert ckpt.name == "step-000002" and state["step"] == 2
    assert [s.name for s, _ in skipped] == ["step-000004"]
    partial = run_copy / "checkpoints" / ".tmp-step-000006"  # a save cut short by a crash
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    result = train(prepared_data, run_copy, resume=True, quiet=True)
    assert not partial.exists()
    err = capsys.readouterr().err
    assert "skipped checkpoint step-000004" in err and target.name in err
    assert result["step"] == 4
    # The bad one is set aside (not resumed, not pruned by step order), a good step 4 replaces it.
    assert (run_copy / "checkpoints" / "corrupt-step-000004").is_dir()
    assert verify_checksums(run_copy / "checkpoints" / "step-000004", required=True)


def test_resume_with_no_intact_checkpoint_is_a_clear_error(run_copy, prepared_data, capsys):
    for ckpt in list_checkpoints(run_copy):
        (ckpt / "config.json").write_text("{}")
    code = main(["train", "--data", str(prepared_data), "--out", str(run_copy), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "cannot resume", "no checkpoint", "config.json")


def test_generate_on_a_corrupted_model_file_names_it(tmp_path, trained_run, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in trained_run.iterdir():  # the model files (checksums.json lists them all)
        if path.is_file():
            shutil.copy(path, model_dir / path.name)
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[:-10])
    code = main(["generate", str(model_dir), "--prompt", "To", "--max-new-tokens", "2"])
    assert_one_line_error(code, capsys.readouterr().err, "model.safetensors", "truncated")
    proc = subprocess.run([sys.executable, "-m", "samout", "eval", str(model_dir), "--data", "x"],
                          capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stderr, "model.safetensors")


def test_top_level_set_from_two_saves_falls_back_to_a_checkpoint(run_copy, capsys):
    """A crash between the renames of the top-level files: new weights, old checksums.json."""
    older = run_copy / "checkpoints" / "step-000002" / "model.safetensors"
    shutil.copy(older, run_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(run_copy)
    code = main(["generate", str(run_copy), "--prompt", "To", "--max-new-tokens", "3", "--seed", "0"])
    captured = capsys.readouterr()
    assert code == 0 and "loading" in captured.err and "step-000004" in captured.err
    assert "Traceback" not in captured.err


def failing(code, message):
    def fail(*args, **kwargs):
        raise OSError(code, message)
    return fail


@pytest.mark.parametrize("target, code, message, says", [
    # The disk fills while the step-4 checkpoint is written.
    ("torch.save", errno.ENOSPC, "No space left on device",
     ["could not write the checkpoint at step 4", "step-000002 is intact"]),
    # The directory is read-only: found before training starts (the run's settings file).
    ("os.replace", errno.EROFS, "Read-only file system", ["cannot write to", "run"]),
])
def test_unwritable_output_keeps_the_previous_checkpoint(tmp_path, prepared_data, monkeypatch, capsys,
                                                         target, code, message, says):
    run = tmp_path / "run"
    settings = dict(TINY_TRAIN, max_steps=6, save_every=2, eval_every=100)
    train(prepared_data, run, preset="tiny", overrides=dict(settings, max_steps=2), quiet=True)
    before = weights(run / "checkpoints" / "step-000002")
    module, name = target.split(".")
    # Tests run as root, where chmod does not stop writes: simulate the failure instead.
    monkeypatch.setattr(getattr(checkpointing, module), name, failing(code, message))
    code = main(["train", "--data", str(prepared_data), "--out", str(run), "--resume", "--max-steps", "6",
                 "--quiet"])
    monkeypatch.undo()
    assert_one_line_error(code, capsys.readouterr().err, message, *says)
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial write is cleaned up
    ckpt, state, skipped = find_resumable(run)
    assert ckpt.name == "step-000002" and not skipped
    assert same_weights(weights(ckpt), before) and same_weights(weights(run), before)
    assert train(prepared_data, run, resume=True, overrides={"max_steps": 4}, quiet=True)["step"] == 4


def test_output_path_that_cannot_be_a_directory(tmp_path, prepared_data, capsys):
    (tmp_path / "file").write_text("not a directory")
    code = main(["train", "--data", str(prepared_data), "--out", str(tmp_path / "file" / "run"), "--preset",
                 "tiny", "--max-steps", "1", "--seq-len", "16", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "cannot write to", "file")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_model_changes_are_refused_on_resume(run_copy, prepared_data, capsys, tmp_path):
    """The same command re-run with --resume is fine; a different model is an error, not ignored."""
    code = main(["train", "--data", str(prepared_data), "--out", str(run_copy), "--resume",
                 "--preset", "tiny", "--hidden-size", "32"])
    assert_one_line_error(code, capsys.readouterr().err, "--resume cannot change the model",
                          "hidden_size 64 (asked 32)")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: small\n")
    with pytest.raises(SamoutError, match="cannot change the model"):
        train(prepared_data, run_copy, resume=True, config_file=cfg)
    cfg.write_text("preset: tiny\nmax_steps: 5\n")
    result = train(prepared_data, run_copy, resume=True, config_file=cfg, preset="tiny", quiet=True)
    assert result["step"] == 5
