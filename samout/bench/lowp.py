"""`samout bench speed --lowp`: decoding with low-precision weights, and training memory
with recomputation.

Three tables, each measured in one run so the ratios compare like with like:

1. Decode (the `--lowp-preset`, default openash-85m, random weights: speed does not depend
   on the values): tokens/s at batch 1, 8 and 64 for float32, bfloat16 and int8 weights
   (samout.quant), one-token steps after a short prompt, all variants timed round-robin
   (`repeats` rounds of `decode_steps` steps; the median step). Beside it the machine's
   memory bandwidth, measured here (the best of several sums over a 256 MiB tensor,
   bigger than any cache), and the float32 ceiling it implies at batch 1:
   bandwidth / bytes of weights read per token.
2. Accuracy (`--accuracy-run RUN_DIR`, a trained model): held-out perplexity with each
   dtype, and greedy agreement = the fraction of validation positions where the dtype's
   most likely next token equals float32's (teacher-forced, so one early difference does
   not count twice).
3. Training memory: peak bytes (parameters + AdamW state + peak allocated during one step,
   as in the speed table) and tokens/s of SamOut with and without `recompute` and of the
   parameter-matched Transformer, at each of `memory_tokens` tokens per step (one
   sequence of that length).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from samout.bench.arguments import command_line, ints, settings_from_args
from samout.bench.common import (
    STEP_LR,
    build_model,
    header_line,
    measure_interleaved,
    median,
    model_specs,
    peak_allocated_bytes,
    prepare_out_dir,
    resolve_device,
    run_header,
    synchronize,
    timed,
    training_step,
    write_json,
    write_report,
)
from samout.config import PRESETS, SamOutConfig
from samout.errors import SamoutError
from samout.files import CONFIG_NAME
from samout.models.transformer_config import DEFAULT_BASELINE
from samout.quant import INFERENCE_DTYPES, convert_for_inference, weight_bytes


@dataclass
class LowpSettings:
    preset: str = "openash-85m"
    batches: list[int] = field(default_factory=lambda: [1, 8, 64])
    dtypes: list[str] = field(default_factory=lambda: list(INFERENCE_DTYPES))
    prompt: int = 16
    decode_steps: int = 8
    repeats: int = 5
    accuracy_run: str | None = None
    accuracy_windows: int = 16
    memory_preset: str = "seed-003"
    memory_vocab: int = 8192
    memory_tokens: list[int] = field(default_factory=lambda: [1024, 4096])
    memory_repeats: int = 5
    baseline: str = DEFAULT_BASELINE  # the Transformer's style in the memory table
    device: str = "cpu"
    seed: int = 0


QUICK = dict(batches=[1, 8], decode_steps=4, repeats=3, memory_tokens=[256], memory_repeats=2,
             accuracy_windows=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `samout bench speed --lowp` (added to those of `samout bench speed`, whose
    --decode-steps and --repeats it shares)."""
    g = parser.add_argument_group("low precision and training memory (--lowp; samout/bench/lowp.py)")
    g.add_argument("--lowp", action="store_true",
                   help="instead: decode tokens/s by --dtype at batch 1/8/64 with the measured bandwidth "
                        "limit, accuracy of --accuracy-run, training memory with/without recompute")
    g.add_argument("--lowp-preset", choices=list(PRESETS), help="decode model (default openash-85m)")
    g.add_argument("--batches", type=ints, help="decode batch sizes (default 1,8,64)")
    g.add_argument("--accuracy-run", metavar="RUN_DIR", help="trained run: perplexity, greedy agreement")
    g.add_argument("--accuracy-windows", type=int, help="validation windows for the accuracy table")
    g.add_argument("--memory-tokens", type=ints, help="memory table tokens/step (default 1024,4096)")


def run(args: argparse.Namespace) -> int:
    """`samout bench speed --lowp`."""
    s = settings_from_args(args, LowpSettings, QUICK,
                           ("batches", "accuracy_run", "accuracy_windows", "memory_tokens", "baseline",
                            "device", "seed"))
    if args.lowp_preset:
        s.preset = args.lowp_preset
    if args.decode_steps:
        s.decode_steps = args.decode_steps
    if args.repeats:
        s.repeats = args.repeats
    if s.accuracy_run and not Path(s.accuracy_run, CONFIG_NAME).is_file():
        raise SamoutError(f"--accuracy-run: no trained model in {s.accuracy_run}")
    results = run_lowp(s, args.out, command=command_line(args), progress=not args.no_progress)
    return write_report(args.out, "lowp", results, format_lowp(results))


def bandwidth_bytes_per_s(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Read bandwidth: the best of `repeats` sums over a tensor larger than the caches."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, timed(lambda: x.sum(), device))
    return x.numel() * 4 / best


@torch.no_grad()
def decode_table(s: LowpSettings, device: torch.device, progress=print) -> dict[str, Any]:
    config = SamOutConfig.from_preset(s.preset)
    steps, rows = {}, []
    base_bytes = None
    for dtype in s.dtypes:
        model = convert_for_inference(build_model(config, device, s.seed), dtype)
        wbytes = weight_bytes(model)
        base_bytes = base_bytes or (wbytes if dtype == "float32" else None)
        for batch in s.batches:
            ids = torch.randint(1, config.vocab_size, (batch, s.prompt), device=device)
            _, state = model(ids)
            token = ids[:, -1:]
            holder = {"state": state}

            def step(model=model, token=token, holder=holder) -> None:
                _, holder["state"] = model(token, state=holder["state"])

            step()  # warm-up (packs weights on first use)
            steps[(dtype, batch)] = step
            rows.append({"dtype": dtype, "batch": batch, "weight_bytes": wbytes, "seconds": []})
    progress(f"decode: {len(steps)} variants x {s.repeats} rounds of {s.decode_steps} steps")
    keys = list(steps)
    for r in range(s.repeats):  # round-robin, rotating who goes first
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            row = next(x for x in rows if (x["dtype"], x["batch"]) == key)
            for _ in range(s.decode_steps):
                row["seconds"].append(timed(steps[key], device))
    bw = bandwidth_bytes_per_s(device)
    f32 = {r["batch"]: r for r in rows if r["dtype"] == "float32"}
    for row in rows:
        row["median_step_s"] = median(row["seconds"])
        row["tokens_per_s"] = row["batch"] / row["median_step_s"]
        if row["batch"] in f32:
            f32_tps = row["batch"] / median(f32[row["batch"]]["seconds"])
            row["speedup_vs_float32"] = row["tokens_per_s"] / f32_tps
    return {"preset": s.preset, "bandwidth_bytes_per_s": bw,
            "float32_weight_bytes": base_bytes,
            "float32_ceiling_tokens_per_s_batch1": bw / base_bytes if base_bytes else None,
            "rows": rows}


@torch.no_grad()
def accuracy_table(s: LowpSettings, device: torch.device) -> dict[str, Any]:
    """Held-out perplexity per dtype and teacher-forced greedy agreement with float32, two
    ways: each window in one call (prompt processing: batched kernels, oneDNN / fbgemm on
    CPU) and one token per call at batch 1 (decoding: samout's row kernels on CPU, where
    they are available), since the two paths round differently."""
    import math

    import numpy as np
    import torch.nn.functional as F

    from samout.data.dataset import TokenData
    from samout.models import load_pretrained
    from samout.run_dir import read_train_config

    run = Path(s.accuracy_run)
    saved = read_train_config(run)
    data = TokenData(saved["data_dir"])
    seq_len = saved.get("seq_len", 256)
    windows = data.eval_windows(seq_len, s.accuracy_windows, "val")
    tokens = data.splits["val"]
    batches = [torch.from_numpy(np.stack([tokens[a:a + n + 1] for a, n in windows if n == length])
                                .astype(np.int64)) for length in sorted({n for _, n in windows})]

    def whole(model, rows):
        return model(rows[:, :-1])[0]

    def stepped(model, rows):
        out = []
        for row in rows[:, :-1]:
            state, logits = None, []
            for t in range(row.shape[0]):
                step, state = model(row[None, t:t + 1], state)
                logits.append(step[0, -1])
            out.append(torch.stack(logits))
        return torch.stack(out)

    out: dict[str, Any] = {"run": str(run), "seq_len": seq_len, "windows": len(windows), "dtypes": {}}
    ref_top: dict[str, Tensor] = {}
    for dtype in s.dtypes:
        model = load_pretrained(run, map_location=str(device), dtype=dtype)
        row: dict[str, float] = {}
        for path, forward in (("", whole), ("decode_", stepped)):
            nats, count, tops = 0.0, 0, []
            for rows in batches:
                rows = rows.to(device)
                logits = forward(model, rows)
                nats += float(F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(),
                                              reduction="sum"))
                count += rows[:, 1:].numel()
                tops.append(logits.argmax(-1).flatten().cpu())
            top = torch.cat(tops)
            ref_top.setdefault(path, top)
            row |= {f"{path}loss": nats / count, f"{path}perplexity": math.exp(nats / count),
                    f"{path}greedy_agreement_vs_float32": float((top == ref_top[path]).float().mean())}
        out["dtypes"][dtype] = row
    out["parameters"] = sum(p.numel() for p in load_pretrained(run).parameters())
    return out


def memory_table(s: LowpSettings, device: torch.device, progress=print) -> dict[str, Any]:
    base = SamOutConfig.from_preset(s.memory_preset, vocab_size=s.memory_vocab)
    rows = []
    for tokens in s.memory_tokens:
        specs = model_specs(base, [base.mixer], base.mixer, baseline=s.baseline,
                            max_position_embeddings=max(4096, tokens))
        variants = {}
        for name, cfg in specs.items():
            if name == "transformer":
                variants["transformer"] = cfg
            else:
                variants[name] = cfg
                variants[name + "+recompute"] = SamOutConfig.from_dict({**cfg.to_dict(), "recompute": True})
        steps, infos = {}, {}
        for name, cfg in variants.items():
            model = build_model(cfg, device, s.seed)
            steps[name], infos[name] = training_step(model, cfg, tokens, tokens, STEP_LR, device)
        progress(f"training memory at {tokens} tokens/step: {', '.join(variants)}")
        seconds = measure_interleaved(steps, s.memory_repeats, device)
        names = list(steps)
        for n in names:
            peak = infos[n]["resident_bytes"] + peak_allocated_bytes(steps[n], device)
            rows.append({"model": n, "tokens_per_step": tokens, "peak_bytes": peak,
                         "median_seconds": median(seconds[n]), "tokens_per_s": tokens / median(seconds[n])})
        tf = next(r for r in rows if r["model"] == "transformer" and r["tokens_per_step"] == tokens)
        plain = next(r for r in rows
                     if r["model"] == f"samout-{base.mixer}" and r["tokens_per_step"] == tokens)
        for r in rows:
            if r["tokens_per_step"] == tokens:
                r["peak_vs_transformer"] = r["peak_bytes"] / tf["peak_bytes"]
                r["speed_vs_samout"] = r["tokens_per_s"] / plain["tokens_per_s"]
    return {"preset": s.memory_preset, "vocab_size": s.memory_vocab, "rows": rows}


def run_lowp(s: LowpSettings, out: str | Path, command: str, progress: bool = True) -> dict[str, Any]:
    out = prepare_out_dir(out)
    device = resolve_device(s.device)
    say = print if progress else (lambda *a: None)
    results: dict[str, Any] = {"benchmark": "lowp", "header": run_header(device, command),
                               "settings": asdict(s)}
    start = time.perf_counter()
    results["decode"] = decode_table(s, device, say)
    if s.accuracy_run:
        say(f"accuracy of {s.accuracy_run}")
        results["accuracy"] = accuracy_table(s, device)
    results["memory"] = memory_table(s, device, say)
    synchronize(device)
    results["seconds"] = time.perf_counter() - start
    results["plots"] = []
    write_json(out / "lowp.json", results)
    return results


def format_lowp(results: dict[str, Any]) -> str:
    h = results["header"]
    d = results["decode"]
    gb = d["bandwidth_bytes_per_s"] / 1e9
    lines = [f"# samout bench speed --lowp — {header_line(h)}", f"# {h['command']}", "",
             f"decode, {d['preset']} (tokens/s, median one-token step; x = vs float32 at the same batch)",
             f"memory read bandwidth here: {gb:.1f} GB/s; float32 weights read per token "
             f"{d['float32_weight_bytes'] / 2**20:.0f} MiB -> float32 ceiling at batch 1: "
             f"{d['float32_ceiling_tokens_per_s_batch1']:.1f} tokens/s",
             f"{'dtype':>9} {'weights':>10} "
             + " ".join(f"{'batch ' + str(b):>18}" for b in results["settings"]["batches"])]
    for dtype in results["settings"]["dtypes"]:
        rows = [r for r in d["rows"] if r["dtype"] == dtype]
        cells = " ".join(f"{r['tokens_per_s']:>9.1f} ({r.get('speedup_vs_float32', 0):.2f}x)" for r in rows)
        lines.append(f"{dtype:>9} {rows[0]['weight_bytes'] / 2**20:>6.0f} MiB {cells}")
    if "accuracy" in results:
        a = results["accuracy"]
        lines += ["", f"accuracy: {a['run']} ({a['parameters']:,} parameters), {a['windows']} validation "
                      f"windows of {a['seq_len']} tokens; each window in one call (prompt) and one "
                      f"token per call at batch 1 (decode)",
                  f"{'dtype':>9} {'path':>7} {'perplexity':>11} {'vs float32':>11} {'greedy agreement':>17}"]
        for path, key in (("prompt", ""), ("decode", "decode_")):
            f32 = a["dtypes"].get("float32", {}).get(f"{key}perplexity")
            for dtype, r in a["dtypes"].items():
                if f"{key}perplexity" not in r:
                    continue  # results written before the decode path was measured
                rel = f"{100 * (r[f'{key}perplexity'] / f32 - 1):+.2f}%" if f32 else "-"
                agree = 100 * r[f"{key}greedy_agreement_vs_float32"]
                lines.append(f"{dtype:>9} {path:>7} {r[f'{key}perplexity']:>11.3f} {rel:>11} {agree:>16.2f}%")
    m = results["memory"]
    lines += ["", f"training memory, {m['preset']} (vocab {m['vocab_size']}), one sequence per step",
              f"{'tokens':>7} {'model':>26} {'peak MiB':>9} {'vs transformer':>15} {'tokens/s':>9} "
              f"{'speed vs samout':>16}"]
    for r in m["rows"]:
        lines.append(f"{r['tokens_per_step']:>7} {r['model']:>26} {r['peak_bytes'] / 2**20:>9.1f} "
                     f"{r['peak_vs_transformer']:>14.3f}x {r['tokens_per_s']:>9.0f} "
                     f"{r['speed_vs_samout']:>15.3f}x")
    return "\n".join(lines)
