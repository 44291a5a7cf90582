"""Every user error: one line on stderr naming the problem, exit status 1, no traceback."""

import json
import re
import subprocess
import sys

import pytest

from samout.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_input_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "input not found", "missing.txt")


def test_missing_input_path_in_a_subprocess(tmp_path):
    """The real entry point: exit status and stderr of `python -m samout`."""
    proc = subprocess.run([sys.executable, "-m", "samout", "prepare", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stderr, "input not found", "nope")


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n   \n")
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "corpus is empty")


@pytest.mark.parametrize("line, problem", [("{not json", "not valid JSON"), ('{"title": "x"}', 'no "text"')])
def test_bad_jsonl_line(capsys, tmp_path, line, problem):
    path = tmp_path / "docs.jsonl"
    good = json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "also fine"}) + "\n"
    path.write_text(good + line + "\n")
    code, _, err = run_cli(capsys, "prepare", str(path), "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, f"{path}:3", problem)


def test_data_dir_not_made_by_prepare(capsys, tmp_path):
    (tmp_path / "notdata").mkdir()
    (tmp_path / "notdata" / "train.bin").write_bytes(b"\0\0")
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "notdata"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "not a data directory made by `samout prepare`")


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_run_dir_without_checkpoint(capsys, tmp_path, command):
    (tmp_path / "run").mkdir()
    extra = ["--prompt", "hi"] if command == "generate" else []
    code, _, err = run_cli(capsys, command, str(tmp_path / "run"), *extra)
    assert_one_line_error(code, err, "no checkpoint in", "run")


def test_resume_without_checkpoint(capsys, tmp_path, prepared_data):
    code, _, err = run_cli(capsys, "train", "--data", str(prepared_data), "--out", str(tmp_path / "r"),
                           "--resume")
    assert_one_line_error(code, err, "no checkpoint in", "to resume")


def test_vocab_size_too_small(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"),
                           "--vocab-size", "100")
    assert_one_line_error(code, err, "vocab size 100 is too small", "special tokens")


def test_seq_len_longer_than_data(capsys, tmp_path, prepared_data):
    code, _, err = run_cli(capsys, "train", "--data", str(prepared_data), "--out", str(tmp_path / "r"),
                           "--preset", "tiny", "--seq-len", "100000000")
    assert_one_line_error(code, err, "sequence length 100000000 is longer than the train data")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bad_config_file(capsys, tmp_path, prepared_data):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nmax_stepz: 3\n")
    code, _, err = run_cli(capsys, "train", "--data", str(prepared_data), "--out", str(tmp_path / "r"),
                           "--config", str(tmp_path / "c.yaml"))
    assert_one_line_error(code, err, "unknown setting(s) max_stepz")
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("command", ["prepare", "train", "generate", "eval"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: samout {command}" in capsys.readouterr().out


# -- defects a new user hit (issue 11) ---------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_an_unavailable_device_is_one_line_in_every_command(no_cuda, capsys, tmp_path, prepared_data,
                                                             trained_run):
    commands = [
        ["train", "--data", str(prepared_data), "--out", str(tmp_path / "run"), "--preset", "tiny",
         "--max-steps", "1", "--seq-len", "16", "--device", "cuda", "--quiet"],
        ["generate", str(trained_run), "--prompt", "To", "--device", "cuda"],
        ["eval", str(trained_run), "--device", "cuda", "--quiet"],
        ["bench", "speed", "--device", "cuda", "--out", str(tmp_path / "bench")],
    ]
    for argv in commands:
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "--device cuda", "CUDA is not available")
        assert "corrupt" not in err and out == ""
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_checks_its_options_before_printing_the_prompt(capsys, trained_run):
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "To be", "--temperature", "-1")
    assert_one_line_error(code, err, "temperature")
    assert out == ""


def test_generate_without_a_prompt_starts_a_document(capsys, trained_run):
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--max-new-tokens", "8", "--seed", "1",
                             "--temperature", "0")
    assert code == 0 and err == ""
    from samout.generation import generate, load_for_generation

    model, tokenizer = load_for_generation(trained_run)
    assert out == generate(model, tokenizer, "", max_new_tokens=8, temperature=0) + "\n"


def test_a_bad_duration_is_one_line_not_the_usage(capsys, prepared_data, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(prepared_data), "--out", str(tmp_path / "r"),
                           "--max-time", "3x")
    assert_one_line_error(code, err, "not a duration", "3x")
    assert "usage" not in err


def test_nul_bytes_are_reported_as_binary(capsys, tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\0" * 100_000)
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "zeros.txt"), "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "zeros.txt", "binary")
    assert "too small" not in err


def test_help_states_each_default_once(capsys):
    for command in ("prepare", "train", "generate", "eval", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text, command
        assert not re.search(r"\(default:? [^)]*\) \(default", text), command
