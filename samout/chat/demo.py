"""The chat demo (`make chat-demo`): pretrain -> SFT -> GRPO (and DPO for comparison) on the
built-in tasks, with a table and GRPO's reward curve (OUT/grpo_reward.png).

    python -m samout.chat.demo --out build/chat-demo [--pretrain-steps 100 --sft-steps 900
                               --grpo-steps 200 --dpo-steps 400]

Pretraining (skipped when OUT/run-pretrain already holds a model) is next-token training on
`pretrain.txt`: the training questions without their answers, so the model knows the words,
numbers and questions but neither the chat format nor the answers. SFT then trains on generated
conversations. GRPO and DPO both start from the SFT model and see the same harder questions
(longer lists, up to three turns): GRPO samples replies and is rewarded for the exact answer
(the `task` reward checks it from the question), DPO learns from generated pairs (chosen =
right, rejected = a plausible wrong answer). Every stage is evaluated on held-out prompts
that never occur in the training files: exact match on SFT-like questions and on the harder
ones ("hard"), and preference accuracy on held-out pairs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from samout.chat.evaluate import evaluate_chat, exact_match
from samout.chat.tasks import write_task_files
from samout.chat.template import load_chat_template
from samout.data.chat import prepare_conversations, read_jsonl
from samout.data.prepare import prepare
from samout.data.prompts import prepare_prompts
from samout.files import WEIGHTS_NAME
from samout.run_dir import load
from samout.training.config import parse_duration
from samout.training.init_from import grow_vocab
from samout.training.setup import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m samout.chat.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/chat-demo")
    p.add_argument("--train-conversations", type=int, default=20000)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--pretrain-steps", type=int, default=100, help="pretraining steps (skipped when reused)")
    p.add_argument("--pretrain-time", default=None, help="also stop pretraining after this long")
    p.add_argument("--sft-steps", type=int, default=900)
    p.add_argument("--sft-time", default=None, help="also stop SFT after this long (default: steps only)")
    p.add_argument("--dpo-steps", type=int, default=400)
    p.add_argument("--dpo-time", default=None, help="also stop DPO after this long (default: steps only)")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--skip-dpo", action="store_true", help="no DPO stage (pretrain -> SFT -> GRPO only)")
    p.add_argument("--grpo-steps", type=int, default=200)
    p.add_argument("--grpo-time", default=None, help="also stop GRPO after this long (default: steps only)")
    p.add_argument("--grpo-lr", type=float, default=3e-4)
    p.add_argument("--grpo-batch", type=int, default=16, help="GRPO: prompts per step")
    p.add_argument("--num-generations", type=int, default=8, help="GRPO: completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--dpo-lr", type=float, default=3e-5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_fields = {"hidden_size": args.hidden_size, "num_layers": args.num_layers,
                    "num_heads": args.num_heads}
    out = Path(args.out)
    start = time.time()
    files = write_task_files(out / "tasks", args.train_conversations, args.heldout, args.seed)
    sft_eval, dpo_eval = files["sft_heldout"], files["dpo_heldout"]

    def stage(name: str) -> None:
        print(f"\n== {name} ({time.time() - start:.0f}s so far)", flush=True)

    pre_run = out / "run-pretrain"
    if not (pre_run / WEIGHTS_NAME).is_file():
        stage("pretraining")
        prepare([str(files["pretrain"])], out / "data-pretrain", vocab_size=1024, quiet=True)
        train(out / "data-pretrain", pre_run, preset="tiny", model_overrides=model_fields,
              overrides={"max_steps": args.pretrain_steps,
                         "max_time": args.pretrain_time and parse_duration(args.pretrain_time),
                         "seq_len": 128,
                         "batch_size": 16, "lr": 3e-3, "warmup_steps": 50, "eval_every": 500,
                         "save_every": 100000, "seed": args.seed})
    else:
        stage(f"reusing the pretrained model in {pre_run}")
    for stale in ("run-sft", "run-dpo", "run-grpo"):  # only the pretrained model is reused
        shutil.rmtree(out / stale, ignore_errors=True)
    prepare_conversations([str(files["sft_train"])], out / "data-sft", "chat", tokenizer=pre_run, quiet=True)

    rows = []

    def evaluate(label: str, run_dir: Path, grow_from: Path | None = None) -> None:
        model, tokenizer = load(run_dir)
        template = load_chat_template(run_dir)
        if grow_from is not None:  # the pretrained model with the chat tokens' new rows
            from samout.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(grow_from)
            model = grow_vocab(model, tokenizer.get_vocab_size())
            template = load_chat_template(grow_from)
        r = evaluate_chat(model, tokenizer, template, sft_eval, dpo_eval)
        hard = [ex.sequences[0] for ex in read_jsonl(Path(dpo_eval), "dpo")]  # prompt + the right answer
        r["exact_match_hard"] = exact_match(model, tokenizer, template, hard)["exact_match"]
        rows.append((label, r))
        print(f"{label}: {json.dumps(r)}", flush=True)

    stage("evaluating the pretrained model")
    evaluate("pretrained", pre_run, grow_from=out / "data-sft")
    stage("SFT")
    sft_run = out / "run-sft"
    train(out / "data-sft", sft_run, overrides={
        "objective": "sft", "init_from": str(pre_run), "max_steps": args.sft_steps,
        "max_time": args.sft_time and parse_duration(args.sft_time), "seq_len": 256, "batch_size": 16,
        "lr": args.sft_lr,
        "warmup_steps": 30, "eval_every": 250, "eval_windows": 4, "save_every": 100000, "seed": args.seed})
    evaluate("SFT", sft_run)
    stage("GRPO")
    prepare_prompts([str(files["grpo_train"])], out / "data-grpo", tokenizer=sft_run, quiet=True)
    grpo_run = out / "run-grpo"
    train(out / "data-grpo", grpo_run, overrides={
        "objective": "grpo", "init_from": str(sft_run), "reward": ["task"], "max_steps": args.grpo_steps,
        "max_time": args.grpo_time and parse_duration(args.grpo_time), "batch_size": args.grpo_batch,
        "num_generations": args.num_generations, "max_completion_length": 12, "lr": args.grpo_lr,
        "warmup_steps": 10, "eval_every": 50, "eval_windows": 4, "log_every": 1, "save_every": 100000,
        "seed": args.seed})
    evaluate("GRPO", grpo_run)
    plot_rewards(grpo_run / "log.jsonl", out / "grpo_reward.png")
    if args.skip_dpo:
        return report(out, rows, start)
    stage("DPO")
    prepare_conversations([str(files["dpo_train"])], out / "data-dpo", "dpo", tokenizer=sft_run, quiet=True)
    dpo_run = out / "run-dpo"
    train(out / "data-dpo", dpo_run, overrides={
        "objective": "dpo", "init_from": str(sft_run), "dpo_beta": args.dpo_beta, "max_steps": args.dpo_steps,
        "max_time": args.dpo_time and parse_duration(args.dpo_time), "seq_len": 256, "batch_size": 16,
        "lr": args.dpo_lr,
        "warmup_steps": 10, "eval_every": 50, "eval_windows": 2, "save_every": 100000, "seed": args.seed})
    evaluate("DPO", dpo_run)
    return report(out, rows, start)


def report(out: Path, rows: list, start: float) -> int:
    print(f"\nheld-out: {rows[0][1]['examples']} conversations, {rows[0][1]['pairs']} preference pairs; "
          f"{time.time() - start:.0f}s in all")
    print(f"| {'stage':<11}| exact match | (1st turn / later turn) | hard (5-7 items) | ends turn "
          "| preference acc. |")
    print("|------------|-------------|-------------------------|------------------|-----------"
          "|-----------------|")
    for label, r in rows:
        first = 100 * r["exact_match_first_turn"]
        print(f"| {label:<11}| {100 * r['exact_match']:10.1f}% | {first:10.1f}% / "
              f"{100 * r['exact_match_later_turn']:6.1f}%    | {100 * r['exact_match_hard']:15.1f}% "
              f"| {100 * r['end_of_turn']:8.1f}% | {100 * r['preference_accuracy']:14.1f}% |")
    (out / "results.json").write_text(json.dumps({label: r for label, r in rows}, indent=2) + "\n")
    return 0


def plot_rewards(log_path: Path, out_path: Path) -> None:
    """GRPO's mean rollout reward per step (and its 10-step running mean) and the greedy
    validation reward, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_points = [(r["step"], r["reward_mean"]) for r in records if r.get("type") == "train"]
    val = [(r["step"], r["val_reward"]) for r in records if r.get("type") == "eval" and "val_reward" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        steps, values = zip(*train_points)
        ax.plot(steps, values, lw=0.8, alpha=0.4, label="rollout reward (mean of the step)")
        window = 10
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, lw=1.5, label=f"running mean ({window} steps)")
    if val:
        ax.plot(*zip(*val), "o-", label="held-out reward (greedy, validation prompts)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward (exact answer = 1)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
