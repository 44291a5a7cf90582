"""`samout bench params|speed|recall|quality|serve|chat|mixers|onnx`: every benchmark of samout.

speed, recall, quality and serve compare SamOut with the matched Transformer and write JSON
and PNG plots into --out; mixers compares the fused and reference kernels; onnx measures the
exported graphs. Each prints a header with the machine, torch version, threads and git
commit (`samout.bench.common.header_lines`). `--quick` runs a small version.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from samout.bench import chat as chat_bench
from samout.bench import lowp as lowp_bench
from samout.bench import mixers as mixers_bench
from samout.bench import onnx_export as onnx_bench
from samout.bench import params as params_bench
from samout.bench import quality as quality_bench
from samout.bench import recall as recall_bench
from samout.bench import serve as serve_bench
from samout.bench import speed as speed_bench
from samout.bench.common import VARIANTS, prepare_out_dir, write_json
from samout.config import MIXERS, PRESETS
from samout.errors import SamoutError
from samout.run_dir import atomic_write


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _duration(text: str) -> float:
    from samout.training.config import parse_duration

    try:
        seconds = parse_duration(text)
    except SamoutError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


def _mixers(text: str) -> list[str]:
    return [m for m in text.replace(",", " ").split() if m]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (SamOut preset; the Transformer is matched to it)")
    g.add_argument("--preset", choices=list(PRESETS), help="SamOut preset to start from")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--mixers", type=_mixers, help=f"comma-separated SamOut mixers ({','.join(MIXERS)})")
    g.add_argument("--match-mixer", choices=MIXERS,
                   help="mixer whose SamOut the Transformer is sized against (default: the preset's)")
    g.add_argument("--positional", choices=["sinusoidal", "rotary"], help="Transformer positions")
    _add_variant_args(g)


def _add_variant_args(g) -> None:
    g.add_argument("--variants", type=_mixers,
                   help=f"comma-separated variants of the preset's SamOut ({','.join(VARIANTS)}): "
                        "hybrids make 1 layer in 4 attention (needs >= 4 layers); give --mixers '' to run "
                        "only these and the Transformer")
    g.add_argument("--window", type=int, help="attention_window of the hybrid-swa variant")


def _add_run_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--quick", action="store_true", help="small, fast settings (a few minutes on 2 cores)")
    p.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark SamOut against a matched softmax Transformer",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")

    speed = sub.add_parser("speed", help="training tokens/s and memory vs length; decode latency and memory"
                           " vs context", description=speed_bench.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(speed)
    g = speed.add_argument_group("what to measure")
    g.add_argument("--lengths", type=_ints, help="training sequence lengths (default 256..8192)")
    g.add_argument("--tokens-per-step", type=int, help="tokens per training step; batch = this / length")
    g.add_argument("--contexts", type=_ints, help="decode context lengths (default 128..32768)")
    g.add_argument("--decode-steps", type=int, help="timed single-token steps per context")
    g.add_argument("--prefill-chunk", type=int, help="tokens per call when building the context state")
    g.add_argument("--repeats", type=int, help="timed training steps per point (median reported)")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g = speed.add_argument_group("low precision and training memory (--lowp; samout/bench/lowp.py)")
    g.add_argument("--lowp", action="store_true",
                   help="instead: decode tokens/s by --dtype at batch 1/8/64 with the measured bandwidth "
                        "limit, accuracy of --accuracy-run, training memory with/without recompute")
    g.add_argument("--lowp-preset", choices=list(PRESETS), help="decode model (default openash-85m)")
    g.add_argument("--batches", type=_ints, help="decode batch sizes (default 1,8,64)")
    g.add_argument("--accuracy-run", metavar="RUN_DIR", help="trained run: perplexity, greedy agreement")
    g.add_argument("--accuracy-windows", type=int, help="validation windows for the accuracy table")
    g.add_argument("--memory-tokens", type=_ints, help="memory table tokens/step (default 1024,4096)")
    _add_run_args(speed, "bench-results")
    speed.set_defaults(func=run_speed_command)

    recall = sub.add_parser("recall", help="multi-query associative recall (MQAR) accuracy",
                            description=recall_bench.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(recall)
    g = recall.add_argument_group("task and training")
    g.add_argument("--tasks", help="comma-separated LENGTHxPAIRS, e.g. 64x4,128x16")
    g.add_argument("--steps", type=int, help="training steps per model and task")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--eval-examples", type=int, help="held-out examples per task")
    _add_run_args(recall, "bench-results")
    recall.set_defaults(func=run_recall_command)

    quality = sub.add_parser("quality", help="validation bits per byte: SamOut mixers vs the matched"
                             " Transformer, trained alike", description=quality_bench.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_argument("--corpus", help="built-in corpus of named works (shakespeare), or a directory "
                         "or glob of .txt files, one document each")
    quality.add_argument("--preset", choices=list(PRESETS), help="SamOut preset (default small)")
    quality.add_argument("--mixers", type=_mixers, help="SamOut mixers to train (default: all)")
    _add_variant_args(quality)
    for name in ("hidden_size", "num_layers", "num_heads"):
        quality.add_argument("--" + name.replace("_", "-"), type=int, help="model override (every run)")
    quality.add_argument("--context-multiples", type=_ints,
                         help="evaluate at these multiples of --seq-len (default 1,2,4)")
    for name, kind in (("vocab_size", int), ("seq_len", int), ("batch_size", int), ("max_steps", int),
                       ("lr", float), ("warmup_steps", int), ("eval_every", int)):
        quality.add_argument("--" + name.replace("_", "-"), type=kind)
    quality.add_argument("--max-time", type=_duration,
                         help="train every model for this long instead (e.g. 5m): equal wall time, "
                              "--max-steps then only caps it")
    quality.add_argument("--work-dir", help="where the data and trained runs go (default OUT/quality-work)")
    _add_run_args(quality, "bench-results")
    quality.set_defaults(func=run_quality_command)

    chat = sub.add_parser("chat", help="per-turn cost of a chat: time to first token of turn k, state "
                          "carried vs history re-prefilled", description=chat_bench.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    chat_bench.add_arguments(chat)
    chat.set_defaults(func=chat_bench.run)
    serve = sub.add_parser("serve", help="samout serve under N concurrent streaming clients: tokens/s, "
                           "latency, memory; follow-up turns with the state cache",
                           description=serve_bench.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--preset", choices=list(PRESETS), help="SamOut preset (default small); the "
                       "Transformer is matched to it")
    serve.add_argument("--clients", type=_ints, help="concurrent clients (default 1,8,32,64)")
    serve.add_argument("--histories", type=_ints, help="history tokens per client (default 512,4096)")
    for name, what in (("max_tokens", "greedy tokens each client asks for (default 64)"),
                       ("follow_up_tokens", "new tokens of a next or follow-up turn (default 16)"),
                       ("repeats", "runs of each one-client point and follow-up (median kept; default 5)"),
                       ("prefill_chunk", "the server's --prefill-chunk (default 512)")):
        serve.add_argument("--" + name.replace("_", "-"), type=int, help=what)
    serve.add_argument("--work-dir", help="where the temporary run directories go (default: system temp)")
    _add_run_args(serve, "bench-results")
    serve.set_defaults(func=run_serve_command)

    params = sub.add_parser("params", help="parameter counts: SamOut presets vs standard and matched"
                            " Transformers", description=params_bench.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    params.add_argument("--out", help="also write params.json (and params.md) into this directory")
    params.set_defaults(func=run_params_command)

    mixers = sub.add_parser("mixers", help="fused vs reference mixer kernels: training speed, memory, MFU,"
                            " decode latency", description=mixers_bench.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    mixers_bench.add_arguments(mixers)
    mixers.set_defaults(func=lambda args: mixers_bench.run(args, command=_command_line(args, spread=True)))

    onnx = sub.add_parser("onnx", help="ONNX export: graph accuracy, int8 size and accuracy, decode latency",
                          description=onnx_bench.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    onnx_bench.add_arguments(onnx)
    onnx.set_defaults(func=lambda args: onnx_bench.run(args, command=_command_line(args, spread=True)))


def _common(args, settings_cls, quick: dict) -> object:
    settings = settings_cls(**quick) if args.quick else settings_cls()
    overrides = dict(settings.overrides)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    settings.overrides = overrides
    for name in ("preset", "mixers", "variants", "window", "match_mixer", "positional", "device", "seed"):
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))
    if args.threads is not None:
        if args.threads <= 0:
            raise SamoutError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    return settings


def _command_line(args, spread: bool = False) -> str:
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


def _apply_flags(settings, args, names: tuple[str, ...]) -> None:
    """Flags the user gave (not None) override the benchmark's settings."""
    for name in names:
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))


def _write_report(args, name: str, results: dict, summary: str) -> int:
    """Write `<name>.txt` beside the JSON and plots, and print the summary."""
    atomic_write(f"{args.out}/{name}.txt", summary + "\n")
    print(summary)
    files = [f"{name}.json", f"{name}.txt", *results.get("plots", [])]
    print(f"\nwrote in {args.out}: {', '.join(files)}")
    return 0


def run_quality_command(args) -> int:
    settings = quality_bench.QualitySettings
    s = settings(**quality_bench.QUICK) if args.quick else settings()
    s.overrides = {**s.overrides, **{k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_heads")
                                     if getattr(args, k) is not None}}
    _apply_flags(s, args, ("corpus", "preset", "mixers", "variants", "window", "context_multiples",
                           "vocab_size", "seq_len", "batch_size", "max_steps", "max_time",
                           "lr", "warmup_steps", "eval_every", "device", "seed", "work_dir"))
    if args.threads is not None:
        if args.threads <= 0:
            raise SamoutError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = quality_bench.run_quality(s, args.out, command=_command_line(args),
                                        progress=not args.no_progress)
    return _write_report(args, "quality", results, quality_bench.format_quality(results))


def run_params_command(args) -> int:
    rows = params_bench.parameter_table()
    table = params_bench.format_params(rows)
    print(table)
    if args.out:
        out = prepare_out_dir(args.out)
        write_json(out / "params.json", {"benchmark": "params", "rows": rows})
        atomic_write(out / "params.md", table + "\n")
    return 0


def run_lowp_command(args) -> int:
    s = lowp_bench.LowpSettings(**lowp_bench.QUICK) if args.quick else lowp_bench.LowpSettings()
    _apply_flags(s, args, ("batches", "accuracy_run", "accuracy_windows", "memory_tokens", "device", "seed"))
    if args.lowp_preset:
        s.preset = args.lowp_preset
    if args.decode_steps:
        s.decode_steps = args.decode_steps
    if args.repeats:
        s.repeats = args.repeats
    if args.threads is not None:
        if args.threads <= 0:
            raise SamoutError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if s.accuracy_run and not Path(s.accuracy_run, "config.json").is_file():
        raise SamoutError(f"--accuracy-run: no trained model in {s.accuracy_run}")
    results = lowp_bench.run_lowp(s, args.out, command=_command_line(args), progress=not args.no_progress)
    return _write_report(args, "lowp", results, lowp_bench.format_lowp(results))


def run_speed_command(args) -> int:
    if args.lowp:
        return run_lowp_command(args)
    s = _common(args, speed_bench.SpeedSettings, speed_bench.QUICK)
    _apply_flags(s, args, ("lengths", "tokens_per_step", "contexts", "decode_steps", "prefill_chunk",
                           "repeats", "lr"))
    command = _command_line(args)
    results = speed_bench.run_speed(s, args.out, command=command, progress=not args.no_progress)
    return _write_report(args, "speed", results, speed_bench.format_speed(results))


def run_recall_command(args) -> int:
    s = _common(args, recall_bench.RecallSettings, recall_bench.QUICK)
    if args.tasks is not None:
        s.tasks = recall_bench.parse_tasks(args.tasks)
    _apply_flags(s, args, ("steps", "batch_size", "lr", "eval_examples"))
    command = _command_line(args)
    results = recall_bench.run_recall(s, args.out, command=command, progress=not args.no_progress)
    return _write_report(args, "recall", results, recall_bench.format_recall(results))


def run_serve_command(args) -> int:
    settings = serve_bench.ServeBenchSettings
    s = settings(**serve_bench.QUICK) if args.quick else settings()
    _apply_flags(s, args, ("preset", "clients", "histories", "max_tokens", "follow_up_tokens", "repeats",
                           "prefill_chunk", "device", "seed"))
    if args.threads is not None:
        if args.threads <= 0:
            raise SamoutError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = serve_bench.run_serve_bench(s, args.out, command=_command_line(args),
                                          progress=not args.no_progress, work_dir=args.work_dir)
    return _write_report(args, "serve", results, serve_bench.format_serve(results))
