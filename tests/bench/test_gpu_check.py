"""scripts/gpu_check.sh and the module it runs, in their CPU smoke mode (tiny sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samout.bench.gpu_check import SMOKE, GpuCheckSettings, run

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_prints_every_figure(tmp_path):
    lines = []
    results = run(GpuCheckSettings(**{**SMOKE, "lengths": [16]}), torch.device("cpu"), tmp_path,
                  print_fn=lines.append)
    assert results["ok"], [c for c in results["checks"] if not c["ok"]]
    checks = {c["check"] for c in results["checks"]}
    assert "samout-openash fused == reference (gradients)" in checks
    assert "transformer (modern) preallocated KV == concatenating KV (one-token steps)" in checks
    trained = {r["model"] for r in results["train"]}
    assert trained == {"samout", "hybrid", "hybrid-swa", "transformer (modern)"}
    assert {(r["model"], r["batch"]) for r in results["decode"]} == {
        (m, b) for m in ("samout", "transformer (modern)") for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in results["train"] + results["decode"])
    decode_lines = [line for line in lines if line.startswith("decode ")]
    assert len(decode_lines) == 4
    # a tiny model is not the author's 85M one: no comparison with the author's figure
    assert not any("1,241" in line for line in decode_lines)
    assert all(r["vs_author_4090"] is None for r in results["decode"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is True


def test_only_the_authors_model_is_compared_with_the_authors_figure(monkeypatch):
    import samout.bench.gpu_check as gpu_check

    monkeypatch.setattr(gpu_check, "AUTHOR_PRESET", SMOKE["decode_preset"])
    rows = gpu_check.decode_throughput(GpuCheckSettings(**SMOKE), torch.device("cpu"))
    assert rows and all(r["vs_author_4090"] == pytest.approx(r["tokens_per_s"] / 1241) for r in rows)


@pytest.mark.slow
def test_gpu_check_script_runs_in_cpu_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== checks and figures" in done.stdout and "device tests" not in done.stdout
    assert "train   transformer (modern)" in done.stdout and (tmp_path / "gpu_check.json").is_file()
    bad = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--fast"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
