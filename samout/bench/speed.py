"""`samout bench speed`: training throughput and memory against sequence length, and
decode latency and memory against context length, for SamOut (each mixer) and the
parameter-matched Transformer, in one run so the ratios compare like with like.

Training: one step = forward, cross-entropy on next tokens, backward, AdamW step,
gradients set to None, exactly what a training loop does; the batch is
`tokens_per_step // length` sequences (at least one). Median of `repeats` timed steps
after one untimed warm-up step (which also creates AdamW's state).

Decoding: batch 1, the context is fed through the model in chunks of `prefill_chunk`
tokens (the state carries over: SamOut's running max, the Transformer's KV cache), then
`decode_steps` single-token calls are timed; median latency.

At each length (or context) all models are built first and their steps are timed
round-robin, so load from elsewhere on the machine hits every model alike.

Memory: bytes of live tensors, not process RSS (see `peak_allocated_bytes`).
  train  peak = parameters + AdamW state + peak allocated during one step
  decode peak = parameters + state after the context + peak allocated during one step
On CPU the step's peak comes from replaying the profiler's allocation events; on CUDA
from `torch.cuda.max_memory_allocated`. `state_bytes` is the exact size of the state.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from samout.bench import lowp
from samout.bench.arguments import (
    MODEL_OVERRIDES,
    add_model_arguments,
    add_run_arguments,
    command_line,
    ints,
    settings_from_args,
)
from samout.bench.common import (
    STEP_LR,
    baseline_label,
    build_model,
    check_mixers,
    check_positive,
    compared_models,
    header_line,
    header_lines,
    measure_interleaved,
    median,
    model_sizes,
    peak_allocated_bytes,
    plot_lines,
    positive_ints,
    prepare_out_dir,
    resolve_device,
    run_header,
    tensor_bytes,
    training_step,
    write_json,
    write_report,
)
from samout.config import MIXERS
from samout.models.transformer_config import DEFAULT_BASELINE

# The Transformer again, decoding with the concatenating KV cache (--kv-reference).
KV_REFERENCE = "transformer-concat"

MEMORY_NOTE = (
    "Bytes of live tensors (allocator caching and the process's code excluded). "
    "train peak = parameters + AdamW state + peak allocated during one training step; "
    "decode peak = parameters + state after the context + peak allocated during one "
    "decode step. CPU: peak from the torch profiler's allocation events; CUDA: "
    "torch.cuda.max_memory_allocated."
)


@dataclass
class SpeedSettings:
    """Everything that defines a speed run (stored in the JSON)."""

    preset: str = "seed-003"
    overrides: dict[str, Any] = field(default_factory=lambda: {"vocab_size": 8192})
    mixers: list[str] = field(default_factory=lambda: list(MIXERS))
    variants: list[str] = field(default_factory=list)  # samout.bench.common.VARIANTS
    window: int = 256  # attention_window of the hybrid-swa variant
    match_mixer: str | None = None  # None: the preset's own mixer
    baseline: str = DEFAULT_BASELINE  # the Transformer's style (BASELINE_STYLES)
    positional: str | None = None  # None: the baseline style's
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    tokens_per_step: int = 8192
    contexts: list[int] = field(default_factory=lambda: [128 * 2**i for i in range(9)])  # ..32768
    decode_steps: int = 16
    prefill_chunk: int = 1024
    repeats: int = 5
    kv_reference: bool = False  # also decode with the old concatenating KV cache (transformer-concat)
    lr: float = STEP_LR
    device: str = "cpu"
    seed: int = 0


# A few minutes on 2 CPU cores: a small model, three lengths and three contexts.
QUICK = dict(
    preset="small",
    overrides={"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_heads": 4},
    lengths=[256, 1024, 4096],
    tokens_per_step=4096,
    contexts=[128, 1024, 8192],
    decode_steps=32,
    prefill_chunk=1024,
    repeats=3,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `samout bench speed` (with those of `--lowp`)."""
    add_model_arguments(parser)
    g = parser.add_argument_group("what to measure")
    g.add_argument("--lengths", type=ints, help="training sequence lengths (default 256..8192)")
    g.add_argument("--tokens-per-step", type=int, help="tokens per training step; batch = this / length")
    g.add_argument("--contexts", type=ints, help="decode context lengths (default 128..32768)")
    g.add_argument("--decode-steps", type=int, help="timed single-token steps per context")
    g.add_argument("--prefill-chunk", type=int, help="tokens per call when building the context state")
    g.add_argument("--repeats", type=int, help="timed training steps per point (median reported)")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--kv-reference", action="store_true", default=None,
                   help=f"also time the Transformer's decode with the old KV cache that concatenates "
                        f"every token ({KV_REFERENCE}), against today's preallocated one")
    lowp.add_arguments(parser)
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`samout bench speed` (or, with --lowp, `samout bench speed --lowp`)."""
    if args.lowp:
        return lowp.run(args)
    s = settings_from_args(args, SpeedSettings, QUICK,
                           ("preset", "mixers", "variants", "window", "match_mixer", "baseline", "positional",
                            "device",
                            "seed", "lengths", "tokens_per_step", "contexts", "decode_steps", "prefill_chunk",
                            "repeats", "kv_reference", "lr"), overrides=MODEL_OVERRIDES)
    results = run_speed(s, args.out, command=command_line(args), progress=not args.no_progress)
    return write_report(args.out, "speed", results, format_speed(results))


def _validate(s: SpeedSettings) -> None:
    s.mixers = check_mixers(s.mixers)
    s.lengths = positive_ints("lengths", s.lengths)
    s.contexts = positive_ints("contexts", s.contexts)
    check_positive(s, ("tokens_per_step", "decode_steps", "prefill_chunk", "repeats"))


@torch.no_grad()
def decoding_step(model, config, context: int, s: SpeedSettings, device):
    """Feed `context` tokens in chunks, then return a one-token step that carries the state on."""
    model.eval()
    ids = torch.randint(1, config.vocab_size, (1, context), device=device)
    state = None
    for start in range(0, context, s.prefill_chunk):
        _, state = model(ids[:, start : start + s.prefill_chunk], state=state)
    token = torch.randint(1, config.vocab_size, (1, 1), device=device)
    holder = {"state": state}

    @torch.no_grad()
    def step() -> None:
        _, holder["state"] = model(token, state=holder["state"])

    step()  # warm-up
    info = {"context": context, "state_bytes": state.nbytes,
            "resident_bytes": tensor_bytes(model.parameters()) + state.nbytes}
    return step, info


def _measure_point(specs, prepare, point: int, repeats: int, s: SpeedSettings,
                   device) -> list[dict[str, Any]]:
    """All models at one length / context: build, warm up (`prepare(model, config, point)`
    returns the step and what it measures), time interleaved, then memory."""
    steps, infos, rows = {}, {}, []
    for name, config in specs.items():
        try:
            model = build_model(config, device, s.seed)
            if name == KV_REFERENCE:
                model.set_kv_cache("concat")
            steps[name], infos[name] = prepare(model, config, point)
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            infos[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
    seconds = measure_interleaved(steps, repeats, device)
    for name in specs:
        row = {"model": name, **infos[name]}
        if name in steps:
            row["seconds"] = seconds[name]
            row["median_seconds"] = median(seconds[name])
            row["step_bytes"] = peak_allocated_bytes(steps[name], device)
            row["peak_bytes"] = row["resident_bytes"] + row["step_bytes"]
        rows.append(row)
    return rows


def run_speed(s: SpeedSettings, out: str | Path, command: str = "samout bench speed",
              progress: bool = True) -> dict[str, Any]:
    """Run the benchmark, write `speed.json` and the plots into `out`, return the results."""
    _validate(s)
    out = prepare_out_dir(out)
    device = resolve_device(s.device)
    specs, matched = compared_models(s, max(max(s.lengths), max(s.contexts) + s.decode_steps + 2))
    header = run_header(device, command)
    decode_specs = {**specs, **({KV_REFERENCE: specs["transformer"]} if s.kv_reference else {})}
    results: dict[str, Any] = {
        "benchmark": "speed", "header": header, "settings": asdict(s), **matched,
        "baseline": baseline_label(specs["transformer"]),
        "memory_note": MEMORY_NOTE, "models": model_sizes(decode_specs), "train": [], "decode": [],
    }
    train = partial(training_step, tokens_per_step=s.tokens_per_step, lr=s.lr, device=device)
    decode = partial(decoding_step, s=s, device=device)
    bar = tqdm(total=len(s.lengths) + len(s.contexts), desc="bench speed", disable=not progress, unit="point")
    for length in s.lengths:
        bar.set_postfix_str(f"train T={length}")
        for row in _measure_point(specs, train, length, s.repeats, s, device):
            if "median_seconds" in row:
                row["tokens_per_s"] = row["tokens_per_step"] / row["median_seconds"]
            results["train"].append(row)
        bar.update()
    for context in s.contexts:
        bar.set_postfix_str(f"decode context={context}")
        for row in _measure_point(decode_specs, decode, context, s.decode_steps, s, device):
            if "median_seconds" in row:
                row["median_latency_ms"] = 1e3 * row["median_seconds"]
                row["tokens_per_s"] = 1 / row["median_seconds"]
            results["decode"].append(row)
        bar.update()
    bar.close()
    results["ratios"] = _ratios(results, [n for n in decode_specs if n != "transformer"])
    write_json(out / "speed.json", results)
    results["plots"] = plot_speed(results, out)
    write_json(out / "speed.json", results)
    return results


def _ratios(results: dict[str, Any], samout_names: list[str]) -> dict[str, Any]:
    """samout / transformer for every measured figure, per length or context."""
    def table(rows, key, figure):
        base = {r[key]: r.get(figure) for r in rows if r["model"] == "transformer"}
        return {
            name: {str(r[key]): (r[figure] / base[r[key]] if base.get(r[key]) and r.get(figure) else None)
                   for r in rows if r["model"] == name}
            for name in samout_names
        }

    return {
        "train_tokens_per_s": table(results["train"], "length", "tokens_per_s"),
        "train_peak_bytes": table(results["train"], "length", "peak_bytes"),
        "decode_latency": table(results["decode"], "context", "median_latency_ms"),
        "decode_peak_bytes": table(results["decode"], "context", "peak_bytes"),
        "decode_state_bytes": table(results["decode"], "context", "state_bytes"),
    }


def model_line(results: dict[str, Any]) -> str:
    c = results["models"]["transformer"]["config"]
    return (f"{baseline_label(c)}, D={c['hidden_size']}, {c['num_layers']} layers, {c['num_heads']} heads, "
            f"vocab {c['vocab_size']}; {results['settings']['tokens_per_step']} tokens/step")


def plot_speed(results: dict[str, Any], out: Path) -> list[str]:
    footer = f"{header_line(results['header'])}; {model_line(results)}"
    names = list(results["models"])

    def series(rows, key, figure, scale=1.0):
        return {n: [(r[key], r[figure] * scale if r.get(figure) is not None else None)
                    for r in rows if r["model"] == n] for n in names}

    mb = 1 / 2**20
    plots = [
        ("speed_train_tokens_per_s.png", "Training throughput (forward + backward + AdamW)",
         "sequence length (tokens)", "tokens / s", series(results["train"], "length", "tokens_per_s"), False),
        ("speed_train_memory.png", "Peak training memory", "sequence length (tokens)", "MiB",
         series(results["train"], "length", "peak_bytes", mb), True),
        ("speed_decode_latency.png", "Per-token decode latency (batch 1)", "context (tokens)", "ms / token",
         series(results["decode"], "context", "median_latency_ms"), True),
        ("speed_decode_memory.png", "Decode memory after the context (params + state + step)",
         "context (tokens)", "MiB", series(results["decode"], "context", "peak_bytes", mb), True),
    ]
    for filename, title, xlabel, ylabel, data, logy in plots:
        plot_lines(out / filename, title, xlabel, ylabel, data, footer, logy)
    return [p[0] for p in plots]


def format_speed(results: dict[str, Any]) -> str:
    """The human summary printed after a run."""
    h = results["header"]
    lines = [*header_lines("speed", h), ""]
    for name, m in results["models"].items():
        lines.append(f"{name:>16}: {m['non_embedding_parameters']:>12,} non-embedding parameters "
                     f"({m['parameters']:,} in all)")
    lines.append(f"(transformer matched to {results['matched_to']}; {model_line(results)})")

    def block(title, rows, key, figure, fmt):
        names = list(results["models"])
        keys = sorted({r[key] for r in rows})
        lines.extend(["", title, f"{key:>8} " + " ".join(f"{n:>16}" for n in names)])
        for k in keys:
            cells = []
            for n in names:
                r = next((r for r in rows if r["model"] == n and r[key] == k), {})
                text = fmt(r[figure]) if r.get(figure) is not None else r.get("error", "-")
                cells.append(f"{text:>16}")
            lines.append(f"{k:>8} " + " ".join(cells))

    def mib(v: float) -> str:
        return f"{v / 2**20:.1f} MiB" if v >= 2**20 else f"{v / 2**10:.1f} KiB"

    block("training tokens/s (median)", results["train"], "length", "tokens_per_s", lambda v: f"{v:,.0f}")
    block("training peak memory", results["train"], "length", "peak_bytes", mib)
    block("decode latency, ms/token (median)", results["decode"], "context", "median_latency_ms",
          lambda v: f"{v:.3f}")
    block("decode state bytes", results["decode"], "context", "state_bytes", mib)
    block("decode peak memory", results["decode"], "context", "peak_bytes", mib)
    lines.extend(["", "ratios samout / transformer (train tokens/s; decode latency; decode peak memory):"])
    r = results["ratios"]
    for name in r["train_tokens_per_s"]:
        t = ", ".join(f"{k}: {v:.2f}" for k, v in r["train_tokens_per_s"][name].items() if v)
        d = ", ".join(f"{k}: {v:.2f}" for k, v in r["decode_latency"][name].items() if v)
        m = ", ".join(f"{k}: {v:.2f}" for k, v in r["decode_peak_bytes"][name].items() if v)
        lines.append(f"  {name}: train [{t}]; decode latency [{d}]; decode memory [{m}]")
    return "\n".join(lines)
