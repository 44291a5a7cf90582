"""The run log (RUN_DIR/log.jsonl, one JSON record per line: "train", "eval", "skip",
"replicas") and its plot (RUN_DIR/loss.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samout.errors import SamoutError
from samout.files import LOG_NAME, PLOT_NAME, atomic_write
from samout.run_dir import latest_checkpoint


class RunLog:
    """Appends records to `run_dir/log.jsonl`; does nothing when not `enabled` (ranks > 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / LOG_NAME

    def append(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise SamoutError(write_error(self.run_dir, step, err, what=LOG_NAME)) from None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint at `step` (they will be redone)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by a crash
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def plot(self) -> None:
        if self.enabled:
            plot_losses(self.path, self.run_dir / PLOT_NAME)


def write_error(run_dir: Path, step: int, err: OSError, what: str = "checkpoint") -> str:
    """The one-line message for a failed write during training (what is still intact)."""
    where = err.filename or run_dir
    kept = latest_checkpoint(run_dir)
    previous = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
    return (f"could not write the {what} at step {step} to {where}: {err.strerror or err} "
            f"({previous}; free space or fix permissions, then --resume)")


def plot_losses(log_path: Path, out_path: Path) -> None:
    """Training and validation loss against step, as a PNG; for a GRPO run (records with
    "reward_mean"), the mean reward of the rollouts and of greedy validation replies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rl = any("reward_mean" in r for r in records if r.get("type") == "train")
    train_key, val_key = ("reward_mean", "val_reward") if rl else ("loss", "val_loss")
    train = [(r["step"], r[train_key]) for r in records if r.get("type") == "train" and train_key in r]
    val = [(r["step"], r[val_key]) for r in records if r.get("type") == "eval" and val_key in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="rollout reward (mean)" if rl else "train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation reward (greedy)" if rl else "validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("reward" if rl else "cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
