"""`python -m samout.bench.gpu_check`: every figure a GPU session owes, in one short run
(`scripts/gpu_check.sh` runs it after the device tests; under 8 minutes on one H100).

1. checks on the device: each mixer's kernels against the reference (outputs and
   gradients), chunked == full and one-token steps (SamOut; the modern Transformer
   with its preallocated KV cache against the concatenating one), Triton against fused
   where Triton runs (CUDA), the Transformer's SDPA (flash / efficient) against math;
2. training tokens/s of SamOut, the hybrids and the modern baseline (SDPA) at 1k, 4k
   and 16k tokens per sequence (same tokens per step), bf16 autocast on CUDA;
3. decode tokens/s of the 85M model (openash-85m) and its matched modern Transformer at
   batch 1 and 64, against the author's 1,241 tokens/s on an RTX 4090 (batch 1).

Without CUDA it runs everything at tiny sizes on the CPU (`--smoke` forces that on a
GPU too): the same code paths, so the tests keep it working; its figures then mean
nothing. Prints one line per figure and writes them to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from samout.bench.common import (
    HYBRID_EVERY,
    build_model,
    header_line,
    measure_interleaved,
    median,
    run_header,
    synchronize,
    variant_fields,
)
from samout.config import MIXERS, SamOutConfig
from samout.models.transformer_config import match_transformer_to
from samout.training.step import clip_and_step, lm_loss

AUTHOR_DECODE_TOKENS_PER_S = 1241  # the author's 85M model on an RTX 4090, batch 1
AUTHOR_PRESET = "openash-85m"  # that model's preset


@dataclass
class GpuCheckSettings:
    preset: str = "small"  # the training-throughput models (hybrids need >= 4 layers)
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of `preset`
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    tokens_per_step: int = 32768
    train_repeats: int = 5
    decode_preset: str = AUTHOR_PRESET
    decode_batches: list[int] = field(default_factory=lambda: [1, 64])
    decode_prompt: int = 128
    decode_steps: int = 64
    check_size: dict[str, int] = field(default_factory=lambda: dict(
        vocab_size=512, hidden_size=128, num_layers=4, num_heads=4))
    check_length: int = 96
    autocast: bool = True  # bf16 autocast for training on CUDA


# Tiny sizes: seconds on a CPU, every path still run.
SMOKE = dict(preset="tiny", overrides={"num_layers": 4}, lengths=[16, 32], tokens_per_step=64,
             train_repeats=1, decode_preset="tiny", decode_batches=[1, 2], decode_prompt=8, decode_steps=2,
             check_size=dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2), check_length=12)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> tuple[bool, float]:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) or 1.0
    err = float((a.float() - b.float()).abs().max()) / scale
    return err <= rel, err


def correctness_checks(s: GpuCheckSettings, device: torch.device) -> list[dict[str, Any]]:
    """Each check: name, ok, the relative error it measured and its bound."""
    from samout.ops.kernels import triton_available

    results = []

    def record(name: str, ok_err: tuple[bool, float], bound: float) -> None:
        results.append({"check": name, "ok": ok_err[0], "rel_error": ok_err[1], "bound": bound})

    torch.manual_seed(0)
    t = s.check_length
    # float32 on both sides; a GPU's reduction orders (and cuDNN's TF32 convolutions) differ
    # more from the CPU-exact reference than the CPU's do.
    tight, loose = (1e-4, 1e-3) if device.type == "cpu" else (2e-3, 2e-2)
    kernels = ["fused"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    for mixer in MIXERS:
        config = SamOutConfig(**s.check_size, mixer=mixer, kernel="reference")
        ref = build_model(config, device).train()
        ids = torch.randint(1, config.vocab_size, (2, t), device=device)
        ref_logits, _ = ref(ids)
        ref_logits.float().square().mean().backward()
        ref_grads = [p.grad.clone() for p in ref.parameters() if p.grad is not None]
        for kernel in kernels:
            model = build_model(config, device)
            model.load_state_dict(ref.state_dict())
            model.set_kernel(kernel).train()
            logits, _ = model(ids)
            logits.float().square().mean().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            record(f"samout-{mixer} {kernel} == reference (logits)", _close(logits, ref_logits, tight), tight)
            worst = max((_close(g, r, loose) for g, r in zip(grads, ref_grads)), key=lambda x: x[1])
            record(f"samout-{mixer} {kernel} == reference (gradients)", worst, loose)
            model.eval()
            with torch.no_grad():
                full, _ = model(ids)
                outs, state = [], None
                for chunk in (ids[:, : t // 3], ids[:, t // 3: t // 3 + 1], ids[:, t // 3 + 1:]):
                    out, state = model(chunk, state)
                    outs.append(out)
            record(f"samout-{mixer} {kernel} chunked == full", _close(torch.cat(outs, 1), full, tight), tight)
        if "triton" in kernels:
            fused = build_model(config, device).eval()
            fused.load_state_dict(ref.state_dict())
            triton = build_model(config, device).eval()
            triton.load_state_dict(ref.state_dict())
            with torch.no_grad():
                got, want = triton.set_kernel("triton")(ids)[0], fused.set_kernel("fused")(ids)[0]
                record(f"samout-{mixer} triton == fused", _close(got, want, tight), tight)
    base = SamOutConfig(**s.check_size)
    tf_config = match_transformer_to(base, max_position_embeddings=4 * t)
    model = build_model(tf_config, device).eval()
    reference = build_model(tf_config, device).eval()
    reference.load_state_dict(model.state_dict())
    reference.set_kv_cache("concat")
    ids = torch.randint(1, base.vocab_size, (2, t), device=device)
    with torch.no_grad():
        full, _ = reference(ids)
        state = ref_state = None
        outs = []
        for i in range(t):
            out, state = model(ids[:, i:i + 1], state)
            ref_out, ref_state = reference(ids[:, i:i + 1], ref_state)
            outs.append(out)
        record("transformer (modern) preallocated KV == concatenating KV (one-token steps)",
               (state.equal(ref_state), 0.0 if state.equal(ref_state) else float("nan")), 0.0)
        record("transformer (modern) one-token steps == full", _close(torch.cat(outs, 1), full, tight), tight)
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                math_out, _ = model(ids)
            record("transformer SDPA (default backend) == math backend", _close(full, math_out, loose), loose)
    return results


def training_throughput(s: GpuCheckSettings, device: torch.device) -> list[dict[str, Any]]:
    """Tokens/s of one training step (the trainer's: loss, backward, clip, AdamW)."""
    base = SamOutConfig.from_preset(s.preset, **s.overrides)
    specs: dict[str, Any] = {"samout": base}
    if base.num_layers >= HYBRID_EVERY:
        for v in ("hybrid", "hybrid-swa"):
            specs[v] = SamOutConfig.from_dict({**base.to_dict(), **variant_fields(v, 256, base.num_layers)})
    specs["transformer (modern)"] = match_transformer_to(base, max_position_embeddings=max(s.lengths))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and s.autocast else None
    rows = []
    for length in s.lengths:
        steps, infos = {}, {}
        batch = max(1, s.tokens_per_step // length)
        for name, config in specs.items():
            try:
                model = build_model(config, device)
                step = _train_step(model, config, batch, length, device, autocast_dtype)
                step()  # warm-up; creates the optimizer state
                steps[name], infos[name] = step, {"batch": batch, "tokens_per_step": batch * length}
            except torch.OutOfMemoryError as err:
                torch.cuda.empty_cache()
                rows.append({"model": name, "length": length, "error": str(err).splitlines()[0]})
        seconds = measure_interleaved(steps, s.train_repeats, device)
        for name in steps:
            tokens = infos[name]["tokens_per_step"]
            rows.append({"model": name, "length": length, "batch": infos[name]["batch"],
                         "tokens_per_s": tokens / median(seconds[name]),
                         "dtype": "bf16 autocast" if autocast_dtype else "float32"})
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _train_step(model, config, batch: int, length: int, device, dtype):
    """The trainer's step (loss under autocast `dtype` if given, backward, clip, AdamW)."""
    from samout.training.step import build_optimizer

    model.train()
    optimizer = build_optimizer(model, lr=3e-4)
    ids = torch.randint(1, config.vocab_size, (batch, length + 1), device=device)

    def step() -> None:
        lm_loss(model, ids[:, :-1], ids[:, 1:], autocast_dtype=dtype).backward()
        clip_and_step(model.parameters(), optimizer, 1.0)

    return step


@torch.inference_mode()
def decode_throughput(s: GpuCheckSettings, device: torch.device) -> list[dict[str, Any]]:
    """Greedy decode tokens/s after a prompt of `decode_prompt` tokens, per batch size."""
    base = SamOutConfig.from_preset(s.decode_preset)
    specs = {"samout": base, "transformer (modern)": match_transformer_to(
        base, max_position_embeddings=s.decode_prompt + s.decode_steps + 8)}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for name, config in specs.items():
        for dtype in dtypes:
            model = build_model(config, device).to(dtype).eval()
            for batch in s.decode_batches:
                ids = torch.randint(1, config.vocab_size, (batch, s.decode_prompt), device=device)
                logits, state = model(ids)
                token = logits[:, -1:].argmax(-1)
                for _ in range(2):  # warm-up
                    logits, state = model(token, state)
                    token = logits[:, -1:].argmax(-1)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(s.decode_steps):
                    logits, state = model(token, state)
                    token = logits[:, -1:].argmax(-1)
                synchronize(device)
                rate = batch * s.decode_steps / (time.perf_counter() - start)
                # Only the author's own model size is comparable with the author's figure.
                vs_author = rate / AUTHOR_DECODE_TOKENS_PER_S if s.decode_preset == AUTHOR_PRESET else None
                rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                             "tokens_per_s": rate, "vs_author_4090": vs_author})
            del model
    return rows


def run(s: GpuCheckSettings, device: torch.device, out: Path | None = None,
        print_fn=print) -> dict[str, Any]:
    header = run_header(device, "python -m samout.bench.gpu_check " + " ".join(sys.argv[1:]))
    results: dict[str, Any] = {"header": header, "settings": asdict(s)}
    print_fn(f"# gpu_check — {header_line(header)}")
    results["checks"] = correctness_checks(s, device)
    for c in results["checks"]:
        print_fn(f"check {'ok  ' if c['ok'] else 'FAIL'} {c['check']} (rel. error {c['rel_error']:.2e}, "
                 f"bound {c['bound']:.0e})")
    results["train"] = training_throughput(s, device)
    for r in results["train"]:
        figure = f"{r['tokens_per_s']:,.0f} tokens/s (batch {r['batch']}, {r['dtype']})" if "error" not in r \
            else r["error"]
        print_fn(f"train {r['model']:>22} T={r['length']:>6}: {figure}")
    results["decode"] = decode_throughput(s, device)
    for r in results["decode"]:
        versus = "" if r["vs_author_4090"] is None else \
            f" ({r['vs_author_4090']:.2f}x the author's {AUTHOR_DECODE_TOKENS_PER_S:,} on an RTX 4090)"
        print_fn(f"decode {s.decode_preset} {r['model']:>22} {r['dtype']:>8} batch {r['batch']:>3}: "
                 f"{r['tokens_per_s']:,.0f} tokens/s{versus}")
    results["ok"] = all(c["ok"] for c in results["checks"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
        print_fn(f"wrote {out / 'gpu_check.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m samout.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the default without CUDA)")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU even if CUDA is there (implies --smoke)")
    p.add_argument("--out", default="bench-results/gpu-check", help="where gpu_check.json goes")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    s = GpuCheckSettings(**SMOKE) if args.smoke or not cuda else GpuCheckSettings()
    results = run(s, device, Path(args.out))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
