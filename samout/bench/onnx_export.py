"""`samout bench onnx`: ONNX export figures: accuracy of the graphs, int8 size and
accuracy, decode latency.

    samout bench onnx                  # trains a small model briefly first
    samout bench onnx --run-dir RUN    # or uses a trained run directory

Untrained weights make int8 look worse than it is (flat, random logits), so without
--run-dir a model is trained for a few hundred steps on the Shakespeare shipped with
samout (five works; the sixth is the held-out text). Latencies are medians of several
repeats, ratios within this run; machine, versions and commit printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from samout.bench.arguments import command_line
from samout.bench.common import header_lines, run_header
from samout.config import SamOutConfig
from samout.data.sources import shakespeare_works
from samout.export.onnx import (
    OnnxSamOut,
    check_onnx,
    compare_models,
    export_onnx,
    quantize_int8,
    torch_step,
)
from samout.files import TOKENIZER_NAME
from samout.models.samout import SamOut
from samout.tokenizer import train_tokenizer

TRAIN_WORKS = 5  # the first five works train the model; the sixth is held out


def train_small(out: Path, steps: int, preset: str) -> tuple[SamOut, Tokenizer, str]:
    works = list(shakespeare_works().values())
    text = "\n".join(works[:TRAIN_WORKS])
    held_out = works[TRAIN_WORKS]
    tokenizer = train_tokenizer([text], vocab_size=2048)
    ids = torch.tensor(tokenizer.encode(text).ids)
    torch.manual_seed(0)
    model = SamOut(SamOutConfig.from_preset(preset, vocab_size=tokenizer.get_vocab_size()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 128, 16
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq + 1] for s in starts])
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  train step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save(str(out / TOKENIZER_NAME))
    return model, tokenizer, held_out


def decode_latency(step, state, repeats: int, tokens: int) -> float:
    """Median seconds per decode step (one token, batch 1)."""
    times = []
    ids = np.array([[5]], dtype=np.int64)
    for _ in range(repeats):
        s = state
        t = time.perf_counter()
        for _ in range(tokens):
            _, s = step(ids, s)
        times.append((time.perf_counter() - t) / tokens)
    return statistics.median(times)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `samout bench onnx`."""
    p.add_argument("--run-dir", type=Path, help="a trained run directory (default: train a small model)")
    p.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    p.add_argument("--preset", default="tiny", help="preset of the small model")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--decode-tokens", type=int, default=200, help="decode steps per timed repeat")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """`samout bench onnx`; `command` is what to record (default: the flags given)."""
    import onnxruntime

    from samout.export.onnx import require_onnx

    require_onnx()  # one clear line if the onnx extra is missing
    torch.set_num_threads(min(2, torch.get_num_threads()))
    command = command or command_line(args, spread=True)
    print("\n".join(header_lines("onnx", run_header(torch.device("cpu"), command))))
    print(f"# onnxruntime {onnxruntime.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.run_dir:
            run_dir = args.run_dir
            model = SamOut.from_pretrained(run_dir).eval()
            tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER_NAME))
            held_out = shakespeare_works()["sonnets_gut.txt"]
        else:
            run_dir = tmp / "run"
            print(f"training {args.preset} for {args.steps} steps ...")
            model, tokenizer, held_out = train_small(run_dir, args.steps, args.preset)
        out = tmp / "onnx"
        result = export_onnx(model, out, log=lambda s: None)
        print(f"export: {result.seconds:.1f} s")
        fp32 = OnnxSamOut(out)
        checks = check_onnx(model, fp32, steps=64)
        print(f"onnx vs pytorch: prefill max|diff| {checks['prefill_max_abs_diff']:.2e}, decode "
              f"{checks['decode_max_abs_diff']:.2e}, greedy equal {checks['greedy_steps_equal']}/64")
        files = quantize_int8(out)
        int8 = OnnxSamOut(out, files["decode.onnx"].name, files["prefill.onnx"].name)
        for name, path in files.items():
            a, b = (out / name).stat().st_size, path.stat().st_size
            print(f"size {name}: float32 {a / 1e6:.2f} MB, int8 {b / 1e6:.2f} MB ({b / a:.0%})")
        text_ids = np.array(tokenizer.encode(held_out).ids[:4096], dtype=np.int64)
        acc = compare_models(fp32, int8, model.config.vocab_size, steps=64, text_ids=text_ids)
        torch_ppl = float(np.exp(torch.nn.functional.cross_entropy(
            model(torch.from_numpy(text_ids[None, :-1]))[0][0], torch.from_numpy(text_ids[1:])).item()))
        print(f"int8 vs float32: max|logit diff| {acc['max_abs_logit_diff']:.3g}, greedy agreement "
              f"{acc['greedy_token_agreement']:.1%} (64 steps, 2 prompts)")
        print(f"held-out perplexity ({acc['perplexity_tokens']} tokens): pytorch {torch_ppl:.3f}, "
              f"onnx float32 {acc['perplexity_reference']:.3f}, onnx int8 {acc['perplexity_candidate']:.3f}")
        state = fp32.init_state(1)
        t_ort = decode_latency(fp32, state, args.repeats, args.decode_tokens)
        t_int8 = decode_latency(int8, state, args.repeats, args.decode_tokens)
        t_torch = decode_latency(torch_step(model), state, args.repeats, args.decode_tokens)
        print(f"decode latency per token (batch 1, median of {args.repeats}): "
              f"pytorch {t_torch * 1e3:.3f} ms, onnxruntime float32 {t_ort * 1e3:.3f} ms "
              f"({t_torch / t_ort:.2f}x), int8 {t_int8 * 1e3:.3f} ms ({t_torch / t_int8:.2f}x)")
    return 0
