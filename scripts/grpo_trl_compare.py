"""Seconds per GRPO step: samout's own `--objective grpo` vs TRL's GRPOTrainer on the same run
and prompts (the chat demo's SFT run and GRPO prompts by default).

    python scripts/grpo_trl_compare.py RUN_DIR PROMPTS_DATA_DIR [--steps 10] [--threads 1]

Same work per step in both: --prompts prompts x --num-generations completions of at most
--max-completion-length tokens, one optimizer step, no KL term, one iteration. TRL runs twice:
with its defaults on CPU (bf16 autocast, activation checkpointing) and in float32 without
checkpointing (what samout's trainer does). The first step (warm-up) is left out of the means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def samout_steps(run: str, data: str, args, out: Path) -> list[float]:
    from samout.training.setup import train

    train(data, out, quiet=True, overrides={
        "objective": "grpo", "init_from": run, "reward": ["task"], "max_steps": args.steps,
        "batch_size": args.prompts, "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "lr": 3e-4, "warmup_steps": 1,
        "log_every": 1, "eval_every": 10**6, "eval_windows": 1, "save_every": 10**6})
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed"] for r in records if r.get("type") == "train"]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def trl_steps(run: str, data: str, args, out: Path, defaults: bool) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import samout  # noqa: F401  (registers with the Auto classes)
    from samout.data.prompts import PromptData
    from samout.training.grpo.rewards import task_reward

    rows = PromptData(data).rows["train"]
    dataset = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    extra = {} if defaults else {"bf16": False, "gradient_checkpointing": False}
    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * args.num_generations,
                        num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, max_steps=args.steps,
                        learning_rate=3e-4, report_to="none", use_vllm=False, use_cpu=True,
                        save_strategy="no", logging_steps=10**6, seed=0, **extra)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(run), reward_funcs=[task_reward],
                          args=config, train_dataset=dataset, callbacks=[Clock()],
                          processing_class=AutoTokenizer.from_pretrained(run))
    trainer.train()
    return times[1:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="grpo-compare-"))
    try:
        results = {
            "samout": samout_steps(args.run, args.data, args, work / "samout"),
            "trl (bf16, checkpointing: its defaults)": trl_steps(args.run, args.data, args, work / "a", True),
            "trl (float32, no checkpointing)": trl_steps(args.run, args.data, args, work / "b", False),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.prompts} prompts x {args.num_generations} completions (<= {args.max_completion_length} "
          f"tokens) per step, {args.steps} steps, {args.threads} thread(s); mean of steps 2..{args.steps}:")
    for name, times in results.items():
        print(f"  {name:<46} {sum(times) / len(times):.3f} s/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
