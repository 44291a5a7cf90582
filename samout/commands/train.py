"""`samout train --data DATA_DIR --out RUN_DIR`: train (or `--resume`) a model."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from samout.commands import add_command
from samout.config import MIXERS
from samout.models import MODEL_CLASSES
from samout.training.config import DEFAULT_PRESET, TrainConfig
from samout.training.setup import train


def train_flags() -> dict[str, dict]:
    """TrainConfig field -> argparse keywords, from the fields' metadata (their `help`): a new
    setting gets its flag by being declared. Defaults are None: an unset flag leaves the config
    file's (or, on --resume, the saved) value alone. Values are checked by TrainConfig, so a
    bad one (`--max-time 3x`) is one line, like a bad value in a config file."""
    hints = typing.get_type_hints(TrainConfig)
    flags = {}
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata or f.metadata.get("flag") is False:
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        if f.metadata.get("append"):
            flags[f.name] = dict(action="append", default=None, metavar=f.name.upper(),
                                 help=f.metadata["help"])
            continue
        if kind is bool:
            flags[f.name] = dict(action="store_true", default=None, help=f.metadata["help"])
            continue
        default = f"{f.default:g}" if isinstance(f.default, float) else f.default
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        help_text += "" if f.default is None else f" (default {default})"
        flags[f.name] = dict(type=str if f.metadata.get("parse") else kind, default=None, help=help_text)
    return flags


MODEL_FLAGS = {
    "hidden_size": (int, "model width D"),
    "num_layers": (int, "number of layers"),
    "num_heads": (int, "number of heads"),
    "mixer": (str, f"token mixer (samout: {', '.join(MIXERS)})"),
}


DESCRIPTION = (
    "Train a model on a data directory made by `samout prepare`. Settings come from "
    "the defaults, then --preset or --config (YAML/JSON with model and training fields), "
    "then these flags. RUN_DIR gets config.json, model.safetensors and tokenizer.json "
    "(the latest model), checkpoints/step-XXXXXX/, log.jsonl and loss.png. "
    "SIGINT/SIGTERM save a checkpoint and exit with 130/143; --resume continues exactly. "
    "Data-parallel: torchrun --nproc_per_node=N -m samout train ... "
    "(--batch-size is per process)."
)


def register(subparsers) -> None:
    p = add_command(subparsers, "train", "train a model on a prepared data directory", DESCRIPTION)
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="data directory from `samout prepare`")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--preset", help=f"model preset (default {DEFAULT_PRESET} unless --config sets one)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with model and training settings")
    p.add_argument("--arch", choices=sorted(MODEL_CLASSES), help="model architecture (default samout)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, kwargs in train_flags().items():
        p.add_argument("--" + name.replace("_", "-"), **kwargs)
    for name, (kind, help_text) in MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in train_flags()}
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
