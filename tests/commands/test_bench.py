import json
import subprocess
import sys

import pytest
import torch

from samout.cli import main

TINY_MODEL = ["--preset", "tiny", "--vocab-size", "32", "--hidden-size", "16", "--num-layers", "1",
              "--num-heads", "2", "--no-progress"]


def test_bench_speed_end_to_end(tmp_path, capsys):
    code = main(["bench", "speed", *TINY_MODEL, "--mixers", "gen4,openash", "--lengths", "8,16",
                 "--tokens-per-step", "32", "--contexts", "4,12", "--decode-steps", "2", "--repeats", "1",
                 "--prefill-chunk", "4", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "training tokens/s" in printed and "torch " + torch.__version__ in printed
    data = json.loads((tmp_path / "speed.json").read_text())
    assert list(data["models"]) == ["samout-gen4", "samout-openash", "transformer"]
    assert data["header"]["command"].startswith("samout bench speed --preset tiny")
    assert data["settings"]["lengths"] == [8, 16]


def test_bench_recall_end_to_end(tmp_path, capsys):
    code = main(["bench", "recall", *TINY_MODEL, "--mixers", "dual", "--tasks", "16x2", "--steps", "2",
                 "--batch-size", "2", "--eval-examples", "4", "--out", str(tmp_path)])
    assert code == 0
    assert "accuracy on held-out queries" in capsys.readouterr().out
    data = json.loads((tmp_path / "recall.json").read_text())
    assert len(data["runs"]) == 2
    # Matched to the preset's own mixer (openash), which was not run: its size is still recorded.
    target = data["matched_target"]["non_embedding_parameters"]
    assert data["matched_target"]["mixer"] == "openash"
    assert abs(data["models"]["transformer"]["non_embedding_parameters"] - target) <= 0.02 * target


@pytest.mark.parametrize("argv, message", [
    (["bench", "speed", "--lengths", "0,16"], "lengths must be positive integers"),
    (["bench", "speed", "--mixers", "gen4,softmax"], "unknown mixer 'softmax'"),
    (["bench", "speed", "--repeats", "0"], "repeats must be a positive integer"),
    (["bench", "speed", "--threads", "0"], "--threads must be positive"),
    (["bench", "recall", "--tasks", "8x4"], "too short for 4 pairs"),
    (["bench", "recall", "--tasks", "eight"], "LENGTHxPAIRS"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cuda_requested_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "speed", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "samout", "bench", "speed", "--out", str(blocker / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "cannot create output directory" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_without_a_benchmark_prints_help(capsys):
    assert main(["bench"]) == 0
    assert "speed" in capsys.readouterr().out


def test_bench_params_counts_real_models(tmp_path, capsys):
    assert main(["bench", "params", "--out", str(tmp_path)]) == 0
    assert "| seed-001 | gen3 | 21,266,480 (12,603,440) |" in capsys.readouterr().out
    rows = {r["preset"]: r for r in json.loads((tmp_path / "params.json").read_text())["rows"]}
    # Same width and depth, textbook 4D FFN: 2 * 4 * 512 * 512 + ... per layer; checked on a real module.
    from samout import Transformer, TransformerConfig

    standard = Transformer(TransformerConfig(vocab_size=8460, hidden_size=512, num_layers=8, num_heads=8,
                                             ffn_hidden_size=2048))
    assert rows["seed-001"]["transformer_4d_ffn"]["parameters"] == standard.num_parameters()
    assert (tmp_path / "params.md").read_text().startswith("| preset |")
    assert "matched modern Transformer FFN width" in (tmp_path / "params.md").read_text()
    assert main(["bench", "params", "--baseline", "seed-004"]) == 0
    assert "| seed-001 | gen3 | 21,266,480 (12,603,440) | 33,883,136 (25,220,096) | 37.2% (50.0%) | 512 " \
        "(12,624,896) |" in capsys.readouterr().out  # docs/benchmarks.md's table, against seed-004


@pytest.mark.parametrize("benchmark", ["speed", "recall", "params", "quality", "serve", "chat", "mixers",
                                       "onnx", "rollout"])
def test_every_benchmark_has_help(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", benchmark, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: samout bench {benchmark}" in capsys.readouterr().out


def test_every_benchmark_declares_its_flags_and_runs_itself():
    from samout.commands.bench import BENCHMARKS

    for name, (module, summary) in BENCHMARKS.items():
        assert callable(module.add_arguments) and callable(module.run), name
        assert module.__doc__ and summary and "\n" not in summary, name


def test_the_readme_names_every_benchmark():
    from pathlib import Path

    from samout.commands.bench import BENCHMARKS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("| `samout bench BENCHMARK`"))
    assert [name for name in BENCHMARKS if f"`{name}`" not in line] == []


def test_make_bench_commands_parse(tmp_path):
    from pathlib import Path

    from samout.cli import build_parser

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    lines = [line.split("samout ", 1)[1] for line in makefile.splitlines() if "/samout bench " in line]
    assert len(lines) >= 4
    for line in lines:
        argv = line.replace("$(BENCH_OUT)", str(tmp_path)).replace("$(BENCH_FLAGS)", "--threads 1").split()
        args = build_parser().parse_args(argv)
        assert args.bench == argv[1] and callable(args.func)


def test_old_handler_names_still_resolve():
    import samout.commands.bench as bench_command
    from samout.bench import lowp, speed

    with pytest.warns(DeprecationWarning, match="samout.bench.speed.run"):
        assert bench_command.run_speed_command is speed.run
    with pytest.warns(DeprecationWarning):
        assert bench_command.run_lowp_command is lowp.run
    with pytest.raises(AttributeError):
        bench_command.run_nothing_command  # noqa: B018
