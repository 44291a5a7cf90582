"""`samout bench mixers`: fused vs reference MaxStateSuper kernels: training speed,
memory, MFU and decode latency.

    samout bench mixers                         # the issue-5 configuration
    samout bench mixers --quick                 # a small run to check it works
    samout bench mixers --threads 1 --seq-lens 256 1024

Both kernels run in the same process on the same weights; every time is the median of
--repeats runs after a warm-up, and the figures to compare are the ratios within one
run (machines shared with other jobs give noisy absolute times). Peak memory is taken
in a fresh subprocess per configuration (growth of peak RSS over one training step) and
also counted exactly as the bytes autograd saves for backward.

MFU = matmul FLOPs of a training step (6 x tokens x Linear weights) per second, over
the matmul throughput this CPU reaches on the model's largest training matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from samout.bench.arguments import command_line
from samout.bench.common import header_lines, run_header
from samout.config import SamOutConfig
from samout.models.samout import SamOut
from samout.models.transformer import Transformer
from samout.models.transformer_config import BASELINE_STYLES, DEFAULT_BASELINE, match_transformer_to
from samout.procmem import proc_status_kib

COMMAND = "samout bench mixers"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    return median_times({"": fn}, repeats, warmup)[""]


def median_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function; the functions take turns, so that a change in
    the machine's load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def build(args, kind: str) -> torch.nn.Module:
    """kind: "reference" or "fused" (SamOut kernels) or "transformer" (the SDPA baseline
    with non-embedding parameters matched to the SamOut model within 2%)."""
    torch.manual_seed(0)
    kernel = "fused" if kind == "transformer" else kind
    config = SamOutConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, mixer=args.mixer, kernel=kernel,
    )
    if kind == "transformer":
        return Transformer(match_transformer_to(config, args.baseline,
                                                max_position_embeddings=max(args.seq_lens) + 1))
    return SamOut(config)


def train_step_fn(model: SamOut, ids: torch.Tensor, optimizer: torch.optim.Optimizer):
    def step():
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def matmul_flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Forward matmul FLOPs per token: 2 x the weights of every Linear (the embedding is
    a lookup). The head-mixing Linear of openash runs per channel, hence x head_dim. A
    Transformer adds causal attention: QK^T and AV, 2 x 2 x D x (T + 1) / 2 per token."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            scale = model.config.head_dim if name.endswith("head_mix") else 1
            total += 2 * module.weight.numel() * scale
    if isinstance(model, Transformer):
        total += model.config.num_layers * 2 * model.config.hidden_size * (seq_len + 1)
    return total


def matmul_fn(args):
    """The model's largest training matmul shape (tokens x D @ D x V) and its FLOPs."""
    n = args.tokens
    a, b = torch.randn(n, args.hidden), torch.randn(args.hidden, args.vocab)
    return (lambda: a @ b), 2 * n * args.hidden * args.vocab


def matmul_throughput(args, repeats: int) -> float:
    fn, flops = matmul_fn(args)
    return flops / median_time(fn, repeats, warmup=2)


def saved_bytes(model: SamOut, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (unique storages), one forward + loss."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def peak_rss_child(args, kernel: str, seq_len: int) -> float:
    """Run one training step in a fresh process; peak RSS during the step minus the RSS
    before it, in MiB (activations, gradients and temporaries; not weights/optimizer)."""
    cmd = [sys.executable, "-m", __name__, "--child-memory", kernel, str(seq_len)] + _model_args(args)
    # Every large block mmapped and unmapped on free: RSS then follows live memory
    # (otherwise glibc keeps freed blocks and the peak hides in reused memory).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peak_mib"] if result["exact"] else float("nan")


def _model_args(args) -> list[str]:
    return [
        "--mixer", args.mixer, "--hidden", str(args.hidden), "--layers", str(args.layers),
        "--heads", str(args.heads), "--vocab", str(args.vocab), "--tokens", str(args.tokens),
        "--threads", str(args.threads), "--seq-lens", *map(str, args.seq_lens),
    ]


def child_memory(args, kernel: str, seq_len: int) -> None:
    model = build(args, kernel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (max(1, args.tokens // seq_len), seq_len + 1))
    # Allocate the optimizer state first, so only the step's own memory is measured.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = _proc_status_kib("VmRSS")
    # Reset the peak-RSS counter (Linux >= 4.0). ru_maxrss would not do: a child
    # process inherits its parent's peak across fork and exec.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    hwm_before = _proc_status_kib("VmHWM")
    train_step_fn(model, ids, optimizer)()
    after = _proc_status_kib("VmHWM")
    exact = exact or after > hwm_before  # otherwise the step's peak may hide below it
    print(json.dumps({"peak_mib": (after - before) / 1024, "exact": exact}))


def _proc_status_kib(field: str) -> int:
    kib = proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")
    return kib


def mixer_times(args, seq_len: int, repeats: int) -> dict:
    """Seconds of one mixer's `mix` forward + backward (streams given), per kernel."""
    from samout.layers import build_mixer

    config = SamOutConfig(mixer=args.mixer, hidden_size=args.hidden, num_heads=args.heads)
    mixer = build_mixer(config)
    batch = max(1, args.tokens // seq_len)
    streams = mixer.project(torch.randn(batch, seq_len, args.hidden)).detach().requires_grad_()
    grad = torch.randn(batch, seq_len, args.hidden)

    def run(kernel):
        def go():
            mixer.set_kernel(kernel)
            y, _ = mixer.mix(streams)
            y.flatten(2).backward(grad)
            streams.grad = None
        return go

    return median_times({k: run(k) for k in ("reference", "fused")}, repeats)


def decode_latencies(model: SamOut, contexts: list[int], steps: int, repeats: int) -> dict:
    """Median seconds per generated token after each context length. The states are
    built first (prefill in chunks), then the contexts take turns in the timing."""
    runs = {}
    with torch.no_grad():
        for context in contexts:
            state, chunk = None, 4096
            ids = torch.randint(0, model.config.vocab_size, (1, context))
            for start in range(0, context, chunk):
                _, state = model(ids[:, start : start + chunk], state)

            def run(state=state, token=ids[:, -1:]):
                for _ in range(steps):
                    _, state = model(token, state)

            runs[context] = run
        return {c: t / steps for c, t in median_times(runs, repeats, warmup=1).items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `samout bench mixers` (also `python -m samout.bench.mixers`)."""
    p.add_argument("--mixer", default="gen4")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per training step")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[128, 32768])
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess RSS runs")
    p.add_argument("--no-transformer", action="store_true", help="skip the Transformer baseline")
    p.add_argument("--baseline", choices=list(BASELINE_STYLES), default=DEFAULT_BASELINE,
                   help=f"the Transformer baseline's style (default {DEFAULT_BASELINE}; seed-004: the "
                        "2017 one)")
    p.add_argument("--sections", nargs="+", choices=["mixer", "train", "decode"],
                   default=["mixer", "train", "decode"], help="which tables to print")
    p.add_argument("--quick", action="store_true", help="small model and lengths, to check it runs")
    p.add_argument("--child-memory", nargs=2, metavar=("KERNEL", "T"), help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv), command=" ".join([COMMAND, *(argv or sys.argv[1:])]))


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """`samout bench mixers`; `command` is what to record (default: the flags given)."""
    command = command or command_line(args, spread=True)  # before --quick changes the flags
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.tokens = 128, 2, 512, 512
        args.seq_lens, args.decode_contexts, args.repeats = [64, 256], [16, 1024], 2
    if args.child_memory:
        child_memory(args, args.child_memory[0], int(args.child_memory[1]))
        return 0

    print("\n".join(header_lines("mixers", run_header(torch.device("cpu"), command))))
    print(f"model: mixer {args.mixer}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}, {args.tokens} tokens per step; step = forward + cross-entropy + "
          f"backward + AdamW; median of {args.repeats}\n")
    peak = matmul_throughput(args, args.repeats + 2)
    with_tf = "train" in args.sections and not args.no_transformer
    kinds = ["reference", "fused"] + (["transformer"] if with_tf else [])
    models = {k: build(args, k) for k in kinds}
    models["fused"].load_state_dict(models["reference"].state_dict())
    sizes = ", ".join(f"{k} {m.num_parameters(exclude_embeddings=True):,}" for k, m in models.items())
    print(f"non-embedding parameters: {sizes}")
    print(f"matmul throughput ({args.tokens}x{args.hidden} @ {args.hidden}x{args.vocab}): "
          f"{peak / 1e9:.1f} GFLOP/s before the runs (MFU uses the figure measured in turn with "
          f"each row's steps, printed in the MFU column); SamOut training matmul FLOPs/token: "
          f"{3 * matmul_flops_per_token(models['fused'], 1) / 1e6:.1f} M\n")

    if "mixer" in args.sections:
        print(f"| T | batch | {args.mixer} mix forward+backward, reference (ms) | fused (ms) | speed-up |")
        print("|---|---|---|---|---|")
        for seq_len in args.seq_lens:
            t = mixer_times(args, seq_len, max(5, args.repeats))
            print(f"| {seq_len} | {max(1, args.tokens // seq_len)} | {t['reference'] * 1e3:.1f} | "
                  f"{t['fused'] * 1e3:.1f} | {t['reference'] / t['fused']:.2f}x |", flush=True)
        print()
    if "train" in args.sections:
        train_table(args, models)
    if "decode" in args.sections:
        decode_table(args, models)
    print("Triton kernel: not implemented (no GPU available when this was written); "
          "on CUDA the fused PyTorch path runs as is.")
    return 0


def train_table(args, models: dict) -> None:
    print("| T | batch | model | tokens/s | vs reference | vs Transformer | MFU | "
          "saved for backward (MiB) | peak step memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        batch = max(1, args.tokens // seq_len)
        ids = torch.randint(0, args.vocab, (batch, seq_len + 1))
        steps = {
            k: train_step_fn(m, ids, torch.optim.AdamW(m.parameters(), lr=1e-4)) for k, m in models.items()
        }
        # The matmul takes its turn with the steps, so MFU compares like with like on a
        # machine whose load changes.
        mm, mm_flops = matmul_fn(args)
        secs = median_times({**steps, "matmul": mm}, args.repeats)
        peak = mm_flops / secs["matmul"]
        rows = {}
        for kernel, model in models.items():
            mem = "-" if args.no_memory else f"{peak_rss_child(args, kernel, seq_len):.0f}"
            mem = "n/a" if mem == "nan" else mem
            rows[kernel] = (batch * seq_len / secs[kernel], saved_bytes(model, ids) / 2**20, mem)
        for kind, (tps, saved, mem) in rows.items():
            mfu = tps * 3 * matmul_flops_per_token(models[kind], seq_len) / peak
            vs_ref = tps / rows["reference"][0]
            vs_tf = f"{tps / rows['transformer'][0]:.2f}x" if "transformer" in rows else "-"
            if "transformer" in rows and mem not in ("-", "n/a") and rows["transformer"][2] != "n/a":
                tf_mem = float(rows["transformer"][2])
                mem = f"{mem} ({float(mem) / tf_mem:.2f}x)"
            name = f"transformer ({args.baseline})" if kind == "transformer" else f"SamOut {kind}"
            print(f"| {seq_len} | {batch} | {name} | {tps:,.0f} | {vs_ref:.2f}x | {vs_tf} | "
                  f"{mfu:.0%} of {peak / 1e9:.0f} GFLOP/s | "
                  f"{saved:.0f} | {mem} |", flush=True)
    print()


def decode_table(args, models: dict) -> None:
    print("| context | SamOut kernel | ms/token | vs shortest context |")
    print("|---|---|---|---|")
    for kernel in ("reference", "fused"):
        model = models[kernel].eval()
        lats = decode_latencies(model, args.decode_contexts, steps=32, repeats=max(5, args.repeats))
        base = lats[args.decode_contexts[0]]
        for context, lat in lats.items():
            print(f"| {context} | {kernel} | {lat * 1e3:.2f} | {lat / base:.2f}x |", flush=True)
    print()


if __name__ == "__main__":  # the memory runs start this module in a fresh process
    raise SystemExit(main())
