"""`samout bench mixers`: a tiny run prints the header and all three tables."""

from samout.cli import main

MODEL = ["--hidden", "32", "--layers", "1", "--heads", "4", "--vocab", "64", "--tokens", "64",
         "--repeats", "1", "--threads", "1"]
TINY = [*MODEL, "--seq-lens", "16", "32", "--decode-contexts", "4", "8"]


def test_tiny_mixer_benchmark_prints_every_table(capsys):
    assert main(["bench", "mixers", *TINY, "--no-memory"]) == 0
    out = capsys.readouterr().out
    header, command = out.splitlines()[:2]
    assert header.startswith("# samout bench mixers — ") and "torch " in header and "commit " in header
    assert command.startswith("# samout bench mixers ") and "--seq-lens 16 32" in command
    assert "| 16 | 4 | " in out and "| 32 | 2 | " in out  # mixer and training rows, batch = tokens / T
    for row in ("SamOut reference", "SamOut fused", "transformer (modern)"):
        assert out.count(f"| {row} |") == 2
    assert out.count("| reference |") == 2 and out.count("| fused |") == 2  # decode, per context


def test_peak_memory_runs_in_a_fresh_process(capsys):
    # The memory column comes from `python -m samout.bench.mixers --child-memory ...`.
    assert main(["bench", "mixers", *MODEL, "--seq-lens", "16", "--sections", "train",
                 "--no-transformer"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 2 and all(row.split("|")[-2].strip().replace(".", "").isdigit() for row in rows)
