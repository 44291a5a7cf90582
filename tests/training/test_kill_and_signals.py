"""Real `samout train` processes: killed with SIGKILL at a random step then resumed, the run
ends bit-identical to an uninterrupted one; SIGINT/SIGTERM save a checkpoint and exit 130/143."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from samout.run_dir import list_checkpoints, verify_checksums
from samout.training.setup import train

# One thread in every process: the same float results in the reference and the resumed run
# whatever the machine's core count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(data, run, max_steps, *extra):
    return [sys.executable, "-m", "samout", "train", "--data", str(data), "--out", str(run),
            "--preset", "tiny",
            "--max-steps", str(max_steps), "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "3",
            "--eval-every", "100000", "--eval-windows", "2", "--log-every", "1", "--device", "cpu",
            "--seed", "7", *extra]


def logged_steps(run):
    path = run / "log.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return max(steps)


def wait_for_step(proc, run, step, timeout=60.0):
    deadline = time.monotonic() + timeout
    while logged_steps(run) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.002)


def train_curve(run):
    records = map(json.loads, (run / "log.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["lr"]) for r in records if r["type"] == "train"]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, prepared_data, capsys):
    max_steps, save_every = 50, 4
    kill_at = random.Random().randint(save_every + 1, 30)
    print(f"kill at step >= {kill_at}")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = subprocess.Popen(train_command(prepared_data, straight, max_steps, "--save-every", "1000",
                                               "--quiet"),
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = subprocess.Popen(train_command(prepared_data, crashed, max_steps,
                                            "--save-every", str(save_every),
                                            "--quiet"),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(victim, crashed, kill_at)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    killed_after = logged_steps(crashed)
    assert killed_after < max_steps
    saved = [int(p.name[5:]) for p in list_checkpoints(crashed)]
    assert saved and 0 < saved[-1] <= killed_after

    # Resumed in this process (saves a process start), on one thread like the reference.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(prepared_data, crashed, resume=True, quiet=False)
    finally:
        torch.set_num_threads(threads)
    assert result["step"] == max_steps
    assert reference.wait(timeout=120) == 0, reference.communicate()
    # It resumed from a checkpoint (not from scratch) and redid the steps after it.
    start = int(capsys.readouterr().out.split("(step ")[1].split(")")[0])
    assert start in saved and start >= save_every
    print(f"killed after step {killed_after}, resumed from step {start}")

    a, b = load_file(straight / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = train_curve(straight)
    assert [s for s, _, _ in curve] == list(range(1, max_steps + 1))
    assert train_curve(crashed) == curve  # every step's loss and lr, exactly
    assert not list((crashed / "checkpoints").glob(".*"))  # a save cut short leaves nothing behind


def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(tmp_path, prepared_data):
    """Both signals at once, in two concurrent runs (one process start's worth of time)."""
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        run = tmp_path / sig.name
        procs[sig] = run, subprocess.Popen(
            train_command(prepared_data, run, 1_000_000, "--save-every", "100000", "--quiet"),
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for sig, (run, proc) in procs.items():
        wait_for_step(proc, run, 3)
        proc.send_signal(sig)
    for sig, (run, proc) in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert "Traceback" not in err
        message = err.strip().splitlines()[-1]
        assert f"interrupted by {sig.name}" in message and "checkpoint saved" in message
        assert "--resume" in message
        step = int(message.split(" at step ")[1].split(":")[0])
        assert step >= 3 and logged_steps(run) == step
        ckpt = run / "checkpoints" / f"step-{step:06d}"
        assert [p.name for p in list_checkpoints(run)] == [ckpt.name]
        assert verify_checksums(ckpt, required=True) and verify_checksums(run)
        result = train(prepared_data, run, resume=True, overrides={"max_steps": step + 2}, quiet=True)
        assert result["step"] == step + 2
