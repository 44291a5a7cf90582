"""`samout export RUN_DIR --onnx OUT_DIR`: ONNX graphs for the edge, checked against PyTorch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samout.commands import add_command
from samout.errors import SamoutError
from samout.run_dir import TOKENIZER_NAME, check_model_dir, load_model, resolve_model_dir

SUMMARY = "export a model to ONNX (decode step + prefill), checked with onnxruntime"
DESCRIPTION = (
    "Write decode.onnx (one token + state in, logits + new state out) and "
    "prefill.onnx (a chunk of tokens + state), compare them with PyTorch in "
    "onnxruntime, and optionally quantize the weights to int8."
)


def register(subparsers) -> None:
    p = add_command(subparsers, "export", SUMMARY, DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="run or model directory (config.json + model.safetensors)")
    p.add_argument("--onnx", metavar="OUT_DIR", required=True, help="directory for the ONNX files")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write int8 dynamically quantized graphs and report size and accuracy")
    p.add_argument("--max-prefill-len", type=int, default=1024,
                   help="longest chunk the prefill graph takes (longer prompts are fed in chunks)")
    p.add_argument("--check-steps", type=int, default=64, help="greedy steps compared with PyTorch")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="a text file for the int8 perplexity comparison (needs tokenizer.json in RUN_DIR)")
    p.add_argument("--text-tokens", type=int, default=2048, help="tokens of --text to score")
    p.set_defaults(func=run)


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    from samout.export.onnx import (
        OnnxSamOut,
        check_onnx,
        compare_models,
        copy_tokenizer,
        export_onnx,
        quantize_int8,
    )
    from samout.models.samout import SamOut

    if args.check_steps < 1:
        raise SamoutError(f"--check-steps must be at least 1, got {args.check_steps}")
    # Like generate and eval: a run whose top-level files were cut short by a crash exports
    # its newest intact checkpoint (with a warning).
    model_dir = resolve_model_dir(check_model_dir(args.run_dir))
    text_ids = None
    if args.text is not None:
        text_ids = _text_ids(model_dir, Path(args.text), args.text_tokens)
    model = load_model(model_dir, verify=False)
    if not isinstance(model, SamOut):
        raise SamoutError(f"{args.run_dir}: ONNX export supports SamOut models, got {type(model).__name__}")
    out_dir = Path(args.onnx)
    result = export_onnx(model, out_dir, max_prefill_len=args.max_prefill_len)
    tokenizer = copy_tokenizer(model_dir, out_dir)
    print(f"exported in {result.seconds:.1f} s to {out_dir}")
    for path in [*result.files.values(), *([tokenizer] if tokenizer else [])]:
        print(f"  {path.name:<24} {_size(path)}")

    onnx_model = OnnxSamOut(out_dir)
    checks = check_onnx(model, onnx_model, steps=args.check_steps)
    print("onnxruntime vs PyTorch:")
    print(f"  prefill logits max |diff| {checks['prefill_max_abs_diff']:.2e}, decode logits "
          f"{checks['decode_max_abs_diff']:.2e}, state {checks['state_max_abs_diff']:.2e}")
    print(f"  greedy tokens equal for {checks['greedy_steps_equal']}/{checks['greedy_steps']} steps")
    report = {"checks": checks}
    if not checks["greedy_equal"] or checks["prefill_max_abs_diff"] > 1e-4:
        raise SamoutError("the ONNX graphs do not match PyTorch (see above); please report this")

    if args.quantize == "int8":
        files = quantize_int8(out_dir)
        quant = OnnxSamOut(out_dir, files["decode.onnx"].name, files["prefill.onnx"].name)
        acc = compare_models(onnx_model, quant, model.config.vocab_size, steps=args.check_steps,
                             text_ids=text_ids)
        print("int8 dynamic quantization (weights int8, activations quantized on the fly):")
        for name, path in files.items():
            print(f"  {path.name:<24} {_size(path)}  (float32 {_size(out_dir / name)}, "
                  f"{path.stat().st_size / (out_dir / name).stat().st_size:.0%})")
        print(f"  max |logit diff| vs float32 {acc['max_abs_logit_diff']:.3g}, greedy token agreement "
              f"{acc['greedy_token_agreement']:.1%} over {args.check_steps} steps")
        if "perplexity_reference" in acc:
            print(f"  perplexity on {acc['perplexity_tokens']} tokens of {args.text}: float32 "
                  f"{acc['perplexity_reference']:.3f}, int8 {acc['perplexity_candidate']:.3f}")
        report["int8"] = acc | {"sizes": {p.name: p.stat().st_size for p in files.values()}}
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _text_ids(run_dir: Path, text: Path, limit: int):
    import numpy as np
    from tokenizers import Tokenizer

    if not text.is_file():
        raise SamoutError(f"--text file not found: {text}")
    tok_path = run_dir / TOKENIZER_NAME
    if not tok_path.is_file():
        raise SamoutError(f"--text needs a tokenizer: {tok_path} is missing")
    ids = Tokenizer.from_file(str(tok_path)).encode(text.read_text(encoding="utf-8", errors="replace")).ids
    if len(ids) < 2:
        raise SamoutError(f"--text {text} has fewer than 2 tokens")
    return np.asarray(ids[:limit], dtype=np.int64)
