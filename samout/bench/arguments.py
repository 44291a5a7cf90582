"""The command-line pieces the benchmarks share: value parsers, the shared flags, the model
flags of the SamOut-vs-Transformer benchmarks, and turning parsed flags into settings.

Each benchmark module declares its own flags (`add_arguments(parser)`) and runs from them
(`run(args) -> int`); `samout/commands/bench.py` only lists the benchmarks.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, TypeVar

import torch

from samout.bench.common import VARIANTS
from samout.config import MIXERS, PRESETS
from samout.errors import SamoutError
from samout.models.transformer_config import BASELINE_STYLES, DEFAULT_BASELINE

# The SamOut fields that --vocab-size etc. override on top of the preset (`settings.overrides`).
MODEL_OVERRIDES = ("vocab_size", "hidden_size", "num_layers", "num_heads")

Settings = TypeVar("Settings")


def ints(text: str) -> list[int]:
    """"256,1024" (or "256 1024") -> [256, 1024]."""
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> list[str]:
    """"gen4,openash" -> ["gen4", "openash"]; "" -> [] (run none of them)."""
    return [m for m in text.replace(",", " ").split() if m]


def duration(text: str) -> float:
    """"5m" -> 300.0 (the duration syntax of `samout train --max-time`)."""
    from samout.training.config import parse_duration

    try:
        seconds = parse_duration(text)
    except SamoutError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every SamOut-vs-Transformer benchmark takes (read by `settings_from_args`)."""
    parser.add_argument("--quick", action="store_true",
                        help="small, fast settings (a few minutes on 2 cores)")
    parser.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The SamOut preset, its overrides and variants, and how the Transformer is matched to it."""
    g = parser.add_argument_group("model (SamOut preset; the Transformer is matched to it)")
    g.add_argument("--preset", choices=list(PRESETS), help="SamOut preset to start from")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--mixers", type=names, help=f"comma-separated SamOut mixers ({','.join(MIXERS)})")
    g.add_argument("--match-mixer", choices=MIXERS,
                   help="mixer whose SamOut the Transformer is sized against (default: the preset's)")
    add_baseline_argument(g)
    g.add_argument("--positional", choices=["sinusoidal", "rotary"],
                   help="Transformer positions (default: the --baseline style's)")
    add_variant_arguments(g)


def add_baseline_argument(group) -> None:
    """--baseline: which Transformer the benchmark compares against (BASELINE_STYLES)."""
    group.add_argument("--baseline", choices=list(BASELINE_STYLES),
                       help=f"the Transformer baseline's style (default {DEFAULT_BASELINE}): modern = "
                            "rotary, RMSNorm, SwiGLU, no biases (Llama-style); seed-004 = the 2017 baseline "
                            "of seed 004 (sinusoidal, LayerNorm, ReLU, biases)")


def add_variant_arguments(group) -> None:
    """--variants and --window: issue 14's variants of the preset's SamOut (common.VARIANTS)."""
    group.add_argument("--variants", type=names,
                       help=f"comma-separated variants of the preset's SamOut ({','.join(VARIANTS)}): "
                            "hybrids make 1 layer in 4 attention (needs >= 4 layers); give --mixers '' to "
                            "run only these and the Transformer")
    group.add_argument("--window", type=int, help="attention_window of the hybrid-swa variant")


def set_threads(threads: int | None) -> None:
    """--threads: torch's CPU threads (None: torch's choice)."""
    if threads is not None:
        if threads <= 0:
            raise SamoutError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)


def apply_flags(settings: Any, args: argparse.Namespace, fields: tuple[str, ...]) -> None:
    """Flags the user gave (not None) override the benchmark's settings of the same name."""
    for name in fields:
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))


def settings_from_args(args: argparse.Namespace, settings_cls: type[Settings], quick: dict[str, Any],
                       fields: tuple[str, ...], overrides: tuple[str, ...] = ()) -> Settings:
    """The benchmark's settings: its defaults (or its QUICK ones under --quick), the model
    `overrides` the user gave added to `settings.overrides`, then every flag of `fields`;
    --threads applied."""
    settings = settings_cls(**quick) if args.quick else settings_cls()
    given = {name: getattr(args, name) for name in overrides if getattr(args, name) is not None}
    if overrides:
        settings.overrides = {**settings.overrides, **given}
    apply_flags(settings, args, fields)
    set_threads(args.threads)
    return settings


def command_line(args: argparse.Namespace, spread: bool = False) -> str:
    """The command as it would be typed (recorded with every figure). spread: list values
    are separate words (flags with nargs), not one comma-separated word."""
    parts = ["samout", "bench", args.bench]
    for name, value in vars(args).items():
        if name in ("func", "command", "bench") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif spread and isinstance(value, list):
            parts += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts += [flag, shlex.quote(text)]
    return " ".join(parts)
