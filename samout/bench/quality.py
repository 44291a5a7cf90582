"""`samout bench quality`: validation bits per byte of SamOut (the default mixer and each
seed mixer) and the matched Transformer, trained on the same data the same way.

Everything goes through the training pipeline users run: `samout.data.prepare.prepare`
builds the data directory (one tokenizer for all models), `samout.training.setup.train`
trains each model (same TrainConfig: batch, length, schedule, token budget, seed), and
`samout.evaluation.evaluate` measures the loss at 1x, 2x and 4x the training context
(a state that only ever grows, like a running max, may degrade beyond what it saw).

The Transformer is the `modern` baseline by default (rotary, RMSNorm, SwiGLU, no biases;
`--baseline modern,seed-004` trains both, the seed-004 one named `transformer-seed-004`).
A rotary baseline is evaluated twice: as trained (`transformer`), and with RoPE scaling
of factor k at k times the training length (`transformer+ntk`, `--rope-scaling ntk,yarn`),
the usual way to run a Transformer beyond its training context without retraining.
`--seeds 0,1,2` trains every model once per seed (same data split) and reports the mean
and the spread (sample standard deviation, min and max) of each figure.

The corpus is split by whole documents (one per input file, e.g. one per play) with
the pipeline's own deterministic split; the validation files are written down in the
JSON and the summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samout.bench.arguments import (
    add_run_arguments,
    add_variant_arguments,
    command_line,
    duration,
    ints,
    names,
    settings_from_args,
)
from samout.bench.common import (
    check_mixers,
    check_names,
    check_variants,
    header_line,
    header_lines,
    parameter_counts,
    plot_lines,
    prepare_out_dir,
    resolve_device,
    run_header,
    variant_fields,
    write_json,
    write_report,
)
from samout.config import PRESETS, SamOutConfig
from samout.errors import SamoutError
from samout.models.transformer_config import BASELINE_STYLES, DEFAULT_BASELINE, ROPE_SCALINGS
from samout.run_dir import LOG_NAME


@dataclass
class QualitySettings:
    corpus: str | None = None  # a built-in corpus of named works ("shakespeare"), a directory or a glob
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)  # model fields on top of the preset (every run)
    mixers: list[str] = field(default_factory=lambda: ["openash", "gen3", "dual", "gen4", "conv"])
    variants: list[str] = field(default_factory=list)  # samout.bench.common.VARIANTS of the preset
    window: int = 64  # attention_window of the hybrid-swa variant
    vocab_size: int = 4096
    val_fraction: float = 0.1
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 2000
    max_time: float | None = None  # seconds: every model trains this long (equal wall time)
    lr: float = 2e-3
    warmup_steps: int = 100
    eval_every: int = 200
    eval_windows: int = 32
    final_eval_windows: int = 64
    context_multiples: list[int] = field(default_factory=lambda: [1, 2, 4])
    baselines: list[str] = field(default_factory=lambda: [DEFAULT_BASELINE])  # Transformer styles
    rope_scaling: list[str] = field(default_factory=lambda: ["ntk"])  # extra eval rows of rotary baselines
    seeds: list[int] | None = None  # training seeds (None: [seed]); the data split always uses `seed`
    device: str = "cpu"
    seed: int = 0
    work_dir: str | None = None  # data and runs; default <out>/quality-work


QUICK = dict(preset="tiny", vocab_size=1024, seq_len=128, batch_size=16, max_steps=200, warmup_steps=20,
             eval_every=50, eval_windows=16, final_eval_windows=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `samout bench quality`: the corpus, the models, and their training."""
    parser.add_argument("--corpus", help="built-in corpus of named works (shakespeare), or a directory "
                        "or glob of .txt files, one document each")
    parser.add_argument("--preset", choices=list(PRESETS), help="SamOut preset (default small)")
    parser.add_argument("--mixers", type=names, help="SamOut mixers to train (default: all)")
    add_variant_arguments(parser)
    for name in ("hidden_size", "num_layers", "num_heads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help="model override (every run)")
    parser.add_argument("--context-multiples", type=ints,
                        help="evaluate at these multiples of --seq-len (default 1,2,4)")
    for name, kind in (("vocab_size", int), ("seq_len", int), ("batch_size", int), ("max_steps", int),
                       ("lr", float), ("warmup_steps", int), ("eval_every", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind)
    parser.add_argument("--max-time", type=duration,
                        help="train every model for this long instead (e.g. 5m): equal wall time, "
                             "--max-steps then only caps it")
    parser.add_argument("--work-dir", help="where the data and trained runs go (default OUT/quality-work)")
    parser.add_argument("--baseline", type=names,
                        help=f"Transformer baseline style(s) to train, comma-separated "
                             f"({','.join(BASELINE_STYLES)}; default {DEFAULT_BASELINE})")
    parser.add_argument("--rope-scaling", type=names,
                        help=f"also evaluate rotary baselines with these RoPE scalings of factor k at k x "
                             f"the length ({','.join(ROPE_SCALINGS)}; default ntk; '' for none)")
    parser.add_argument("--seeds", type=ints, help="train every model with each of these seeds (e.g. 0,1,2): "
                        "mean and spread reported")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`samout bench quality` (--vocab-size is the tokenizer's, a setting, not a model override)."""
    s = settings_from_args(args, QualitySettings, QUICK,
                           ("corpus", "preset", "mixers", "variants", "window", "context_multiples",
                            "vocab_size", "seq_len", "batch_size", "max_steps", "max_time", "lr",
                            "warmup_steps", "eval_every", "rope_scaling", "seeds", "device", "seed",
                            "work_dir"),
                           overrides=("hidden_size", "num_layers", "num_heads"))
    if args.baseline is not None:
        s.baselines = args.baseline
    results = run_quality(s, args.out, command=command_line(args), progress=not args.no_progress)
    return write_report(args.out, "quality", results, format_quality(results))


def corpus_files(corpus: str) -> list[str]:
    """The inputs for `prepare`: [corpus] for a built-in corpus, else its .txt files in name order.

    The built-in `shakespeare` holds the same files, in the same order, as a directory of
    the plays, so both give the same split and the same validation files.
    """
    from samout.data.sources import BUILTIN_CORPORA

    path = Path(corpus)
    if corpus in BUILTIN_CORPORA and not path.exists():
        return [corpus]  # a built-in corpus (shakespeare: one document per work; kjv: per chapter)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix == ".txt"
                       and not p.name.isupper() and p.name != "COPYING.txt")
    else:
        import glob

        files = sorted(glob.glob(corpus))
    if len(files) < 2:
        raise SamoutError(f"--corpus {corpus}: need a directory or glob with at least 2 .txt files")
    return files


def _curve(run_dir: Path) -> list[dict[str, Any]]:
    """Eval records of a run's log, each with the training seconds at that step."""
    records = [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed"] for r in records if r["type"] == "train"}
    return [{"step": r["step"], "tokens": r["tokens"], "elapsed": elapsed.get(r["step"]),
             "val_bpb": r["val_bpb"], "val_loss": r["val_loss"]} for r in records if r["type"] == "eval"]


def run_quality(s: QualitySettings, out: str | Path, command: str = "samout bench quality",
                progress: bool = True) -> dict[str, Any]:
    from samout.data.dataset import TokenData
    from samout.data.prepare import MIN_SPLIT_UNITS, prepare, split_documents
    from samout.data.sources import load_documents
    from samout.evaluation import evaluate
    from samout.models import load_pretrained
    from samout.tokenizer import load_tokenizer, token_byte_lengths
    from samout.training.setup import train

    if not s.corpus:
        raise SamoutError("give the text to train on with --corpus shakespeare (built in) or --corpus DIR "
                          "(one document per file)")
    check_mixers(s.mixers)
    preset = SamOutConfig.from_preset(s.preset, **s.overrides)
    check_variants(s.variants, preset)
    baselines = _check_baselines(s)  # every name checked before any data is prepared
    out = prepare_out_dir(out)
    device = resolve_device(s.device)
    files = corpus_files(s.corpus)
    docs, _ = load_documents(files)
    if len(docs) < MIN_SPLIT_UNITS:  # prepare() would cut documents into pieces instead
        raise SamoutError(f"--corpus {s.corpus}: {len(docs)} documents; a split by whole documents needs "
                          f"at least {MIN_SPLIT_UNITS} documents")
    _, val_idx = split_documents(docs, s.val_fraction, s.seed)  # the split prepare() makes
    val_files = [Path(docs[i].source).name for i in val_idx]
    if len({Path(d.source).name for d in docs}) < len(docs):  # e.g. kjv: every chapter is "kjv"
        val_files = [f"{s.corpus} document {i}" for i in val_idx]
    work = Path(s.work_dir) if s.work_dir else out / "quality-work"
    data_dir = work / "data"
    prepare(files, data_dir, vocab_size=s.vocab_size, val_fraction=s.val_fraction, seed=s.seed, quiet=True)
    data = TokenData(data_dir)
    token_bytes = token_byte_lengths(load_tokenizer(data.tokenizer_path))
    longest = s.seq_len * max(s.context_multiples)
    data.check_seq_len(longest, split="val")
    seeds = list(dict.fromkeys(s.seeds)) if s.seeds else [s.seed]
    train_settings = dict(seq_len=s.seq_len, batch_size=s.batch_size, max_steps=s.max_steps, lr=s.lr,
                          warmup_steps=s.warmup_steps, eval_every=s.eval_every, eval_windows=s.eval_windows,
                          save_every=s.max_steps, keep_checkpoints=1, log_every=s.eval_every,
                          device=str(device), seed=s.seed, max_time=s.max_time)
    runs = {f"samout-{m}": {**s.overrides, "mixer": m} for m in s.mixers}
    runs.update({v: {**s.overrides, **variant_fields(v, s.window, preset.num_layers)} for v in s.variants})
    for baseline in baselines:
        runs[transformer_name(baseline)] = {**s.overrides, "model_type": "transformer", "baseline": baseline,
                                            "max_position_embeddings": max(4096, longest)}
    results: dict[str, Any] = {
        "benchmark": "quality", "work_dir": str(work), "header": run_header(device, command),
        "settings": asdict(s),
        "split": {"unit": "document (one per file or work)", "validation_files": val_files,
                  "training_files": len(docs) - len(val_files), "seed": s.seed,
                  "val_fraction": s.val_fraction},
        "train_config": train_settings, "seeds": seeds, "models": {},
    }
    base = SamOutConfig.from_preset(s.preset, **{**s.overrides, "vocab_size": data.vocab_size})
    per_seed: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, int]] = {}
    for seed in seeds:
        for name, model_fields in runs.items():
            run_dir = work / "runs" / name if len(seeds) == 1 else work / "runs" / name / f"seed-{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh run each time: the benchmark owns this directory
            result = train(data_dir, run_dir, preset=s.preset, overrides={**train_settings, "seed": seed},
                           model_overrides=model_fields, quiet=not progress)
            model = load_pretrained(run_dir)
            counts[name] = parameter_counts(model)
            evaluations = {name: None}
            if getattr(model.config, "positional", None) == "rotary":
                evaluations.update({f"{name}+{kind}": kind for kind in s.rope_scaling})
            for row, kind in evaluations.items():
                contexts = {}
                for k in s.context_multiples:
                    if kind:
                        model.set_rope_scaling(_scaling(kind, k, s.seq_len))
                    ev = evaluate(model, data, token_bytes, s.seq_len * k, max_windows=s.final_eval_windows,
                                  batch_size=max(1, s.batch_size // k), device=device)
                    contexts[str(k)] = {"seq_len": s.seq_len * k, "loss": ev.loss,
                                        "bits_per_byte": ev.bits_per_byte}
                if kind:
                    model.set_rope_scaling(None)
                    counts[row] = counts[name]
                record = {"contexts": contexts}
                if kind is None:
                    record.update(tokens=result["tokens"], train_seconds=result["elapsed"],
                                  curve=_curve(run_dir))
                else:
                    record["rope_scaling"] = {"type": kind, "factor": "k (the context multiple)"}
                per_seed.setdefault(row, {})[str(seed)] = record
    for name, by_seed in per_seed.items():
        results["models"][name] = {**counts[name], **_summarize(by_seed, s.context_multiples)}
    results["baselines"] = {transformer_name(b): f"{b} baseline" for b in baselines}
    results["matched_to"] = f"samout-{base.mixer}"
    results["plots"] = plot_quality(results, out)
    write_json(out / "quality.json", results)
    return results


def transformer_name(baseline: str) -> str:
    """The run name of a baseline style: `transformer` for the default (modern) one."""
    return "transformer" if baseline == DEFAULT_BASELINE else f"transformer-{baseline}"


def _check_baselines(s: QualitySettings) -> list[str]:
    baselines = check_names(s.baselines, BASELINE_STYLES, "baseline")
    check_names(s.rope_scaling, ROPE_SCALINGS, "RoPE scaling")
    return baselines


def _scaling(kind: str, multiple: int, seq_len: int) -> dict[str, Any] | None:
    """RoPE scaling of factor `multiple` (none at 1x: the model as trained)."""
    if multiple <= 1:
        return None
    scaling: dict[str, Any] = {"type": kind, "factor": float(multiple)}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = seq_len
    return scaling


def _spread(values: list[float]) -> dict[str, float]:
    import statistics

    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _summarize(by_seed: dict[str, dict[str, Any]], multiples: list[int]) -> dict[str, Any]:
    """One model's figures over its seeds: the means where one figure is expected (tokens,
    train_seconds, each context's loss and bits_per_byte, the curve by step), the spread
    beside them, and every seed's own record under `seeds`."""
    runs = list(by_seed.values())
    out: dict[str, Any] = {"seeds": by_seed, "contexts": {}}
    for k in map(str, multiples):
        bpb = _spread([r["contexts"][k]["bits_per_byte"] for r in runs])
        out["contexts"][k] = {"seq_len": runs[0]["contexts"][k]["seq_len"],
                              "loss": _spread([r["contexts"][k]["loss"] for r in runs])["mean"],
                              "bits_per_byte": bpb["mean"], "bits_per_byte_spread": bpb}
    if "curve" in runs[0]:
        out["tokens"] = round(_spread([r["tokens"] for r in runs])["mean"])
        out["train_seconds"] = _spread([r["train_seconds"] for r in runs])["mean"]
        steps = [c["step"] for c in runs[0]["curve"] if all(
            any(d["step"] == c["step"] for d in r["curve"]) for r in runs)]
        out["curve"] = []
        for step in steps:
            points = [next(d for d in r["curve"] if d["step"] == step) for r in runs]
            elapsed = [p["elapsed"] for p in points if p["elapsed"]]
            out["curve"].append({
                "step": step, "tokens": points[0]["tokens"],
                "elapsed": _spread(elapsed)["mean"] if len(elapsed) == len(points) else None,
                "val_bpb": _spread([p["val_bpb"] for p in points])["mean"],
                "val_bpb_std": _spread([p["val_bpb"] for p in points])["std"],
                "val_loss": _spread([p["val_loss"] for p in points])["mean"]})
    else:
        out["rope_scaling"] = runs[0]["rope_scaling"]
    return out


def plot_quality(results: dict[str, Any], out: Path) -> list[str]:
    """Validation curves (the mean over seeds when there are several) of the trained models."""
    seeds = results.get("seeds") or [None]
    footer = header_line(results["header"]) + (f"; mean of seeds {seeds}" if len(seeds) > 1 else "")
    trained = {n: m for n, m in results["models"].items() if "curve" in m}
    by_tokens = {n: [(c["tokens"], c["val_bpb"]) for c in m["curve"]] for n, m in trained.items()}
    by_time = {n: [(c["elapsed"], c["val_bpb"]) for c in m["curve"] if c["elapsed"]]
               for n, m in trained.items()}
    plot_lines(out / "quality_bpb_vs_tokens.png", "Validation bits per byte against tokens seen",
               "training tokens", "bits per byte", by_tokens, footer, logx=False)
    plot_lines(out / "quality_bpb_vs_time.png", "Validation bits per byte against training time",
               "training seconds", "bits per byte", by_time, footer, logx=False)
    return ["quality_bpb_vs_tokens.png", "quality_bpb_vs_time.png"]


def _short_list(items: list[str], keep: int = 8) -> str:
    if len(items) <= keep:
        return ", ".join(items)
    return ", ".join(items[:keep]) + f", ... ({len(items)} in all)"


def format_quality(results: dict[str, Any]) -> str:
    h = results["header"]
    mult = results["settings"]["context_multiples"]
    seeds = results.get("seeds") or [results["settings"]["seed"]]
    several = len(seeds) > 1
    width = 17 if several else 9
    lines = [*header_lines("quality", h),
             f"validation files: {_short_list(results['split']['validation_files'])}"]
    for name, label in results.get("baselines", {}).items():
        scaled = any(n.startswith(f"{name}+") for n in results["models"])
        lines.append(f"{name}: the {label}" + (f"; {name}+<scaling>: the same model evaluated with that "
                     "RoPE scaling of factor k at k x the training length" if scaled else ""))
    if several:
        lines.append(f"seeds {','.join(map(str, seeds))}: mean ± sample standard deviation")
    lines += ["", f"{'model':>24} {'non-emb. params':>16} {'tokens':>10} {'seconds':>8} "
              + " ".join(f"{f'bpb@{k}x':>{width}}" for k in mult)]
    for name, m in results["models"].items():
        cells = []
        for k in mult:
            c = m["contexts"][str(k)]
            text = f"{c['bits_per_byte']:.4f}"
            if several:
                text += f" ± {c['bits_per_byte_spread']['std']:.4f}"
            cells.append(f"{text:>{width}}")
        tokens = f"{m['tokens']:>10,}" if "tokens" in m else f"{'-':>10}"
        seconds = f"{m['train_seconds']:>8.0f}" if "train_seconds" in m else f"{'-':>8}"
        lines.append(f"{name:>24} {m['non_embedding_parameters']:>16,} {tokens} {seconds} {' '.join(cells)}")
    return "\n".join(lines)
