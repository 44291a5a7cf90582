"""`samout train --data DATA_DIR --out RUN_DIR`: train (or `--resume`) a model."""

from __future__ import annotations

import argparse
import os
import sys

from samout.errors import SamoutError
from samout.models import MODEL_CLASSES
from samout.training.config import parse_duration
from samout.training.trainer import DEFAULT_PRESET, train

# CLI flag -> TrainConfig field. Defaults are None: unset flags leave the config file's
# (or, on --resume, the saved) value alone.
TRAIN_FLAGS = {
    "max_steps": (int, "total optimizer steps (a resumed run continues up to this)"),
    "max_tokens": (int, "stop after this many training tokens"),
    "max_time": (lambda text: _duration(text), "stop after this much training time, e.g. 240s, 4m, 1h"),
    "seq_len": (int, "tokens per training sequence"),
    "batch_size": (int, "sequences per micro-batch"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "warmup_steps": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay (matrices only)"),
    "grad_clip": (float, "gradient norm clipping"),
    "dtype": (str, "float32 or bfloat16 (autocast)"),
    "device": (str, "auto, cpu, cuda, cuda:1, ..."),
    "seed": (int, "seed of initialisation and data order"),
    "eval_every": (int, "evaluate every N steps"),
    "eval_windows": (int, "validation windows per periodic evaluation"),
    "save_every": (int, "checkpoint every N steps"),
    "keep_checkpoints": (int, "how many checkpoints to keep"),
    "log_every": (int, "log training loss every N steps"),
    "max_bad_steps": (int, "stop after this many consecutive non-finite steps (each is skipped)"),
    "objective": (str, "lm (next token, default), sft (assistant tokens of --format chat data) or dpo "
                       "(--format dpo data, needs --init-from)"),
    "dpo_beta": (float, "DPO: strength of the pull towards the reference model (default 0.1)"),
    "init_from": (str, "start from this run's model, tokenizer and model config (fresh optimizer and "
                       "schedule); for dpo also the frozen reference"),
}
MODEL_FLAGS = {
    "hidden_size": (int, "model width D"),
    "num_layers": (int, "number of layers"),
    "num_heads": (int, "number of heads"),
    "mixer": (str, "token mixer (samout: gen3, dual, gen4, openash, conv)"),
}


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except SamoutError as err:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a prepared data directory",
        description="Train a model on a data directory made by `samout prepare`. Settings come from "
                    "the defaults, then --preset or --config (YAML/JSON with model and training fields), "
                    "then these flags. RUN_DIR gets config.json, model.safetensors and tokenizer.json "
                    "(the latest model), checkpoints/step-XXXXXX/, log.jsonl and loss.png. "
                    "SIGINT/SIGTERM save a checkpoint and exit with 130/143; --resume continues exactly. "
                    "Data-parallel: torchrun --nproc_per_node=N -m samout train ... "
                    "(--batch-size is per process).",
    )
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="data directory from `samout prepare`")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--preset", help=f"model preset (default {DEFAULT_PRESET} unless --config sets one)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with model and training settings")
    p.add_argument("--arch", choices=sorted(MODEL_CLASSES), help="model architecture (default samout)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the model with FSDP2 instead of DDP (see README)")
    for table in (TRAIN_FLAGS, MODEL_FLAGS):
        for name, (kind, help_text) in table.items():
            p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in TRAIN_FLAGS}
    overrides["fsdp"] = args.fsdp
    model_overrides = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    if args.arch:
        model_overrides["model_type"] = args.arch
    result = train(args.data, args.out, preset=args.preset, config_file=args.config, overrides=overrides,
                   model_overrides=model_overrides, resume=args.resume, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 128 + result["signal"] if result.get("signal") else 0
    if result.get("signal"):
        print(f"samout train: {result['stop_reason']} at step {result['step']}: checkpoint saved in "
              f"{args.out}; continue with --resume", file=sys.stderr)
        return 128 + result["signal"]  # the shell convention: 130 for SIGINT, 143 for SIGTERM
    line = (f"done: step {result['step']}, {result['tokens']:,} tokens, {result['elapsed']:.0f}s "
            f"({result['stop_reason']})")
    if "val_bpb" in result:
        line += f"; val loss {result['val_loss']:.4f}, val bits/byte {result['val_bpb']:.4f}"
    print(line)
    if (args.objective or "lm") == "lm":
        print(f"model saved in {args.out}; try: samout generate {args.out} --prompt 'And'")
    else:
        print(f"model saved in {args.out}; try: samout chat {args.out}")
    return 0
