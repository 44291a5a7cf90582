"""What every benchmark shares: the run header, model pairs, timing and memory helpers."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samout
from samout.config import MIXERS, SamOutConfig
from samout.device import resolve_device  # noqa: F401  (the benchmarks' import of it)
from samout.errors import SamoutError
from samout.models.samout import SamOut
from samout.models.transformer import Transformer
from samout.models.transformer_config import DEFAULT_BASELINE, TransformerConfig, match_transformer_to
from samout.training.config import TrainConfig
from samout.training.step import build_optimizer, clip_and_step, lm_loss

REPO = Path(__file__).resolve().parents[2]

GRAD_CLIP = TrainConfig.grad_clip  # the clipping a default training run applies
# AdamW's learning rate in the timed training steps of speed and lowp's memory table (a
# step costs the same at any rate).
STEP_LR = 3e-4


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the checkout samout runs from, with "-dirty" for uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def run_header(device: torch.device, command: str) -> dict[str, Any]:
    """Machine, versions and commit, printed and stored with every figure."""
    header = {
        "command": command,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "samout": samout.__version__,
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    return header


def header_line(header: dict[str, Any]) -> str:
    where = header.get("gpu") or f"{header['machine']}, {header['cpu_cores']} cores"
    return (f"{where}, torch {header['torch']} ({header['torch_threads']} threads), "
            f"commit {header['git_commit'][:12]}")


def header_lines(benchmark: str, header: dict[str, Any]) -> list[str]:
    """The lines every benchmark's printed summary starts with: machine, torch version and
    threads, commit (`header_line`), then the command that produced the figures."""
    return [f"# samout bench {benchmark} — {header_line(header)}, {header['date_utc']}",
            f"# {header['command']}"]


def check_names(names: list[str], allowed, what: str, flag: str = "") -> list[str]:
    """`names` without repeats, each one of `allowed`; else the one-line error
    "[FLAG: ]unknown WHAT 'name': choose from ...". """
    for name in names:
        if name not in allowed:
            prefix = f"{flag}: " if flag else ""
            raise SamoutError(f"{prefix}unknown {what} {name!r}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def check_mixers(mixers: list[str]) -> list[str]:
    return check_names(mixers, MIXERS, "mixer")


def positive_ints(name: str, values: list[int]) -> list[int]:
    if not values or any(v <= 0 for v in values):
        raise SamoutError(f"{name} must be positive integers, got {values}")
    return sorted(set(values))


def check_positive(settings: Any, fields: tuple[str, ...]) -> None:
    """Each of `fields` of the settings is a positive integer."""
    for name in fields:
        if getattr(settings, name) <= 0:
            raise SamoutError(f"{name} must be a positive integer, got {getattr(settings, name)}")


# Issue 14's variants of the base SamOut (its own mixer): name -> config fields. The
# sliding window is `window` (a benchmark setting). Attention layers have 4 D^2
# parameters, as many as the gen4/openash projection they replace, so every variant has
# the base's non-embedding parameters to within 5 H^2 + 3 per swapped layer (+ D per layer
# for δ), and the Transformer matched to the base is matched to each of them.
#
# The hybrids put attention second in every block of HYBRID_EVERY layers and give their
# maxstate layers the forgetting max started at δ = HYBRID_DECAY_INIT: a maxstate layer
# with a fast-forgetting max below the attention layer carries the previous token into
# each position (max(x_t, m_{t-1} - δ) keeps a strong recent input for a few steps), which
# is what attention needs to look a key up and read the value after it (an induction
# head). Without it the hybrids did not learn MQAR at all (docs/benchmarks.md, "Hybrid
# layers"); `hybrid-last` (attention_every, attention last, no decay) and `hybrid-nodecay`
# (attention second, no decay) are those diagnostics.
VARIANTS = ("samout", "samout-decay", "hybrid", "hybrid-swa", "hybrid-nodecay", "hybrid-last")
HYBRID_EVERY = 4
HYBRID_DECAY_INIT = 0.5


def hybrid_layer_types(num_layers: int, every: int = HYBRID_EVERY) -> list[str]:
    """Attention second in every block of `every` layers: maxstate, attention, maxstate, ..."""
    return ["attention" if i % every == 1 else "maxstate" for i in range(num_layers)]


def variant_fields(name: str, window: int, num_layers: int) -> dict[str, Any]:
    hybrid = {"layer_types": hybrid_layer_types(num_layers), "max_decay": True,
              "max_decay_init": HYBRID_DECAY_INIT}
    table = {
        "samout": {},
        "samout-decay": {"max_decay": True},
        "hybrid": hybrid,
        "hybrid-swa": {**hybrid, "attention_window": window},
        "hybrid-nodecay": {"layer_types": hybrid_layer_types(num_layers)},
        "hybrid-last": {"attention_every": HYBRID_EVERY},
    }
    if name not in table:
        raise SamoutError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    return table[name]


def check_variants(variants: list[str], base: SamOutConfig | None = None) -> list[str]:
    for v in variants:
        variant_fields(v, 1, HYBRID_EVERY)  # an unknown name is the error here
        if v.startswith("hybrid") and base is not None and base.num_layers < HYBRID_EVERY:
            raise SamoutError(f"variant {v} makes 1 layer in {HYBRID_EVERY} attention: it needs --num-layers "
                              f">= {HYBRID_EVERY} (got {base.num_layers})")
    return list(dict.fromkeys(variants))


def model_specs(base: SamOutConfig, mixers: list[str], match_mixer: str, variants: list[str] = (),
                window: int = 64, baseline: str = DEFAULT_BASELINE,
                **transformer_overrides: Any) -> dict[str, Any]:
    """The configs compared: SamOut with each mixer, each of `variants` (VARIANTS) of the
    base, and one Transformer of style `baseline` (modern or seed-004) matched to SamOut
    with `match_mixer` (mixers differ in size by up to ~30%, so the matched figure is for
    that one; every model's count is reported)."""
    specs: dict[str, Any] = {f"samout-{m}": SamOutConfig.from_dict({**base.to_dict(), "mixer": m})
                             for m in mixers}
    for v in check_variants(list(variants), base):
        specs[v] = SamOutConfig.from_dict({**base.to_dict(), **variant_fields(v, window, base.num_layers)})
    match_to = SamOutConfig.from_dict({**base.to_dict(), "mixer": match_mixer})
    specs["transformer"] = match_transformer_to(match_to, baseline, **transformer_overrides)
    return specs


def baseline_label(config: dict[str, Any] | TransformerConfig) -> str:
    """How a benchmark's output names its Transformer: "modern baseline", "seed-004
    baseline", or "custom baseline (the options)"."""
    if isinstance(config, dict):
        config = TransformerConfig.from_dict(config)
    if config.style != "custom":
        return f"{config.style} baseline"
    return (f"custom baseline ({config.positional}, {config.norm_type}, {config.activation}, "
            f"{'biases' if config.bias else 'no biases'})")


def transformer_options(s: Any) -> dict[str, Any]:
    """The Transformer style a benchmark's settings ask for: `baseline` and, when given,
    `positional` over the style's."""
    options: dict[str, Any] = {"baseline": getattr(s, "baseline", None) or DEFAULT_BASELINE}
    if getattr(s, "positional", None):
        options["positional"] = s.positional
    return options


def compared_models(s: Any, longest: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configs a speed or recall run compares, from its settings (preset, overrides,
    mixers, variants, window, match_mixer, baseline, positional; the Transformer holds `longest`
    positions, at least 4096), and which SamOut the Transformer is matched to."""
    base = SamOutConfig.from_preset(s.preset, **s.overrides)
    match_mixer = s.match_mixer or base.mixer
    check_mixers([match_mixer])
    specs = model_specs(base, s.mixers, match_mixer, s.variants, s.window, **transformer_options(s),
                        max_position_embeddings=max(4096, longest))
    return specs, {"matched_to": f"samout-{match_mixer}", "matched_target": matched_target(base, match_mixer)}


def matched_target(base: SamOutConfig, match_mixer: str) -> dict[str, Any]:
    """Which SamOut the Transformer was sized against, and its non-embedding count (it
    need not be among the models run)."""
    from samout.models.transformer_config import samout_non_embedding_parameters

    config = SamOutConfig.from_dict({**base.to_dict(), "mixer": match_mixer})
    return {"mixer": match_mixer, "non_embedding_parameters": samout_non_embedding_parameters(config)}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {"parameters": model.num_parameters(),
            "non_embedding_parameters": model.num_parameters(exclude_embeddings=True)}


def model_sizes(specs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each compared model's config and parameter counts (built on the meta device)."""
    return {name: {"config": config.to_dict(), **parameter_counts(build_model(config, torch.device("meta")))}
            for name, config in specs.items()}


def build_model(config, device: torch.device, seed: int = 0) -> nn.Module:
    cls = Transformer if config.model_type == "transformer" else SamOut
    if device.type == "meta":  # sizes only, nothing allocated
        with torch.device("meta"):
            return cls(config)
    torch.manual_seed(seed)
    return cls(config).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_interleaved(steps: dict[str, Callable[[], Any]], repeats: int,
                        device: torch.device) -> dict[str, list[float]]:
    """Time every model's step `repeats` times, round-robin (rotating who goes first), so
    that load from elsewhere on the machine falls on all models alike."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds[name].append(timed(steps[name], device))
    return seconds


def training_step(model: nn.Module, config, length: int, tokens_per_step: int, lr: float,
                  device: torch.device) -> tuple[Callable[[], None], dict[str, Any]]:
    """The trainer's own step (loss, backward, clip, AdamW) on a fixed random batch of
    `tokens_per_step // length` sequences (at least one), run once to create the optimizer
    state; and what it measures: the batch and the bytes live between steps."""
    model.train()
    optimizer = build_optimizer(model, lr=lr)
    batch = max(1, tokens_per_step // length)
    ids = torch.randint(1, config.vocab_size, (batch, length + 1), device=device)

    def step() -> None:
        lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        clip_and_step(model.parameters(), optimizer, GRAD_CLIP)

    step()  # warm-up; creates the optimizer state
    resident = tensor_bytes(model.parameters()) + tensor_bytes(
        t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)
    )
    info = {"length": length, "batch": batch, "tokens_per_step": batch * length, "resident_bytes": resident}
    return step, info


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def peak_allocated_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors allocated *during* `fn` above what was live before it.

    On CUDA this is `torch.cuda.max_memory_allocated` (minus the bytes allocated at the
    start). On CPU there is no allocator counter, so the allocation and free events that
    the torch profiler records (`profile_memory=True`) are replayed in time order and the
    running total's maximum is taken: the same quantity, allocator caching excluded.
    (The profiler does not see frees of tensors allocated before it started, so if such a
    tensor died mid-step the figure would err high, never low.)
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs start/stop lines to fd 2; keep the user's terminal clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from samout.run_dir import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_report(out: str | Path, name: str, results: dict[str, Any], summary: str) -> int:
    """Write `<name>.txt` beside the JSON and plots, and print the summary."""
    from samout.run_dir import atomic_write

    atomic_write(f"{out}/{name}.txt", summary + "\n")
    print(summary)
    files = [f"{name}.json", f"{name}.txt", *results.get("plots", [])]
    print(f"\nwrote in {out}: {', '.join(files)}")
    return 0


def prepare_out_dir(out: str | Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SamoutError(f"cannot create output directory {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise SamoutError(f"output directory {out} is not writable")
    return out


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
               footer: str, logy: bool = False, logx: bool = True) -> None:
    """One PNG: a line per model, log2 x axis (lengths double), the run header as footer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points = [(x, y) for x, y in points if y is not None]
        if points:
            xs, ys = zip(*points)
            style = dict(color="black", linestyle="--", linewidth=2) if name == "transformer" else {}
            ax.plot(xs, ys, marker="o", label=name, **style)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, footer, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
