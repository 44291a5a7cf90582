"""`torchrun --nproc_per_node=2 -m samout train` on CPU (gloo): the ranks' weights stay
identical, and the losses match a single process with the same global batch (2 micro-batches
per step, so DDP's no_sync path is used); the run resumes under DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch

from samout.models import load_pretrained
from samout.run_dir import list_checkpoints, load_training_state
from samout.training.distributed import parameter_digest
from samout.training.setup import train

SETTINGS = ["--preset", "tiny", "--seq-len", "32", "--warmup-steps", "2", "--eval-every", "1000",
            "--eval-windows", "2", "--save-every", "3", "--log-every", "1", "--device", "cpu", "--seed", "5",
            "--grad-accum", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")]


def torchrun(data, run, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "samout", "train", "--data", str(data), "--out", str(run), *SETTINGS, *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records(run, kind):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, prepared_data):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    first = torchrun(prepared_data, ddp, "--max-steps", "3", "--batch-size", "2")
    assert first.stdout.count("done: step 3") == 1  # rank 0 alone reports
    state = load_training_state(list_checkpoints(ddp)[-1])
    assert state["data_position"]["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    second = torchrun(prepared_data, ddp, "--max-steps", "6", "--batch-size", "2", "--resume")
    assert "resuming" in second.stdout and "(step 3)" in second.stdout

    # The same schedule (3 steps, then resumed to 6) on one process with batch 2 x 2.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = dict(seq_len=32, warmup_steps=2, eval_every=1000, eval_windows=2, save_every=3,
                         log_every=1, device="cpu", seed=5, batch_size=4, grad_accum=2)
        train(prepared_data, single, preset="tiny", overrides=dict(overrides, max_steps=3), quiet=True)
        train(prepared_data, single, overrides={"max_steps": 6}, resume=True, quiet=True)
    finally:
        torch.set_num_threads(threads)

    # Replicas: every rank's parameter hash, at the end of both sessions, equal to each other
    # and to the weights rank 0 saved.
    saved = parameter_digest(load_pretrained(ddp))
    replicas = records(ddp, "replicas")
    assert [r["step"] for r in replicas] == [3, 6]
    assert all(r["param_sha256"] == [saved, saved] for r in replicas[-1:])
    assert len(set(replicas[0]["param_sha256"])) == 1

    a = [(r["step"], r["loss"]) for r in records(ddp, "train")]
    b = [(r["step"], r["loss"]) for r in records(single, "train")]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    for (step, loss_ddp), (_, loss_one) in zip(a, b):
        assert loss_ddp == pytest.approx(loss_one, rel=1e-5), f"step {step}"
    w_ddp, w_one = load_pretrained(ddp).state_dict(), load_pretrained(single).state_dict()
    worst = max(float((w_ddp[k] - w_one[k]).abs().max()) for k in w_one)
    print(f"largest weight difference DDP vs one process after 6 steps: {worst:.2e}")
    assert worst < 1e-4
    assert not list((ddp / "checkpoints").glob(".*"))  # no leftovers of concurrent writers


def test_fsdp2_on_cpu_matches_one_process(tmp_path, prepared_data):
    """--fsdp: parameters sharded over 2 processes (gloo); the same losses as one process with
    the same global batch, and a checkpoint in the ordinary format."""
    run, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(prepared_data, run, "--max-steps", "4", "--batch-size", "2", "--fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(prepared_data, single, preset="tiny", quiet=True,
              overrides=dict(seq_len=32, warmup_steps=2, eval_every=1000, eval_windows=2, save_every=3,
                             log_every=1, device="cpu", seed=5, batch_size=4, grad_accum=2, max_steps=4))
    finally:
        torch.set_num_threads(threads)
    state = load_training_state(list_checkpoints(run)[-1])
    assert state["train_config"]["fsdp"] is True and state["step"] == 4
    a = [(r["step"], r["loss"]) for r in records(run, "train")]
    b = [(r["step"], r["loss"]) for r in records(single, "train")]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, loss_fsdp), (_, loss_one) in zip(a, b):
        assert loss_fsdp == pytest.approx(loss_one, rel=1e-5), f"step {step}"
    w_fsdp, w_one = load_pretrained(run).state_dict(), load_pretrained(single).state_dict()
    assert w_fsdp.keys() == w_one.keys()
    assert max(float((w_fsdp[k] - w_one[k]).abs().max()) for k in w_one) < 1e-4
