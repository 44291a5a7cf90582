"""`samout eval RUN_DIR [--data DATA_DIR]`: loss, perplexity, bits per byte, loss by position."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samout.commands import add_command
from samout.data.dataset import TokenData
from samout.device import DEVICE_HELP
from samout.errors import SamoutError
from samout.evaluation import evaluate
from samout.quant import add_dtype_argument
from samout.run_dir import TOKENIZER_NAME, load, read_train_config
from samout.tokenizer import token_byte_lengths

DESCRIPTION = (
    "Validation loss, perplexity and bits per byte (comparable across tokenizers) of a run "
    "or model directory, and the loss by position in the context."
)


def register(subparsers) -> None:
    p = add_command(subparsers, "eval", "evaluate a model on validation data", DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run or model directory")
    p.add_argument("--data", metavar="DATA_DIR", help="data directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which split (default val)")
    p.add_argument("--seq-len", type=int, help="context length (default: the training seq_len)")
    p.add_argument("--max-windows", type=int, help="evaluate only this many windows (default all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rope-scaling", metavar="TYPE:FACTOR",
                   help="a rotary Transformer beyond its training length: RoPE scaling, e.g. ntk:4 at 4x "
                        "the training seq_len (ntk, linear, yarn)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_dtype_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_rope_scaling(text: str, trained_len: int) -> dict:
    """"ntk:4" -> {"type": "ntk", "factor": 4.0}; yarn also gets the training length."""
    kind, _, factor = text.partition(":")
    try:
        scaling = {"type": kind.strip(), "factor": float(factor)}
    except ValueError:
        raise SamoutError(f"--rope-scaling {text!r}: expected TYPE:FACTOR, e.g. ntk:4") from None
    if scaling["type"] == "yarn":
        scaling["original_max_position_embeddings"] = int(trained_len)
    return scaling


def apply_rope_scaling(model, text: str, trained_len: int, run_dir: Path) -> None:
    if not hasattr(model, "set_rope_scaling"):
        raise SamoutError(f"--rope-scaling: {run_dir} is not a Transformer (RoPE scaling applies to a rotary "
                          "Transformer)")
    try:
        model.set_rope_scaling(parse_rope_scaling(text, trained_len))
    except ValueError as err:
        raise SamoutError(f"--rope-scaling: {err}") from None


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    model, tokenizer = load(run_dir, device=args.device, dtype=args.dtype)
    saved = read_train_config(run_dir)
    data_dir = args.data or saved.get("data_dir")
    if data_dir is None:
        raise SamoutError(f"{run_dir} does not say which data it was trained on: pass --data DATA_DIR")
    data = TokenData(data_dir)
    if data.tokenizer_path.read_bytes() != (run_dir / TOKENIZER_NAME).read_bytes():
        raise SamoutError(f"{data_dir} was tokenized with another tokenizer than {run_dir}: "
                          f"prepare it with --tokenizer {run_dir / TOKENIZER_NAME}")
    seq_len = args.seq_len or saved.get("seq_len") or 256
    if args.rope_scaling:
        apply_rope_scaling(model, args.rope_scaling, saved.get("seq_len") or seq_len, run_dir)
    result = evaluate(model, data, token_byte_lengths(tokenizer), seq_len, split=args.split,
                      max_windows=args.max_windows, batch_size=args.batch_size, device=args.device,
                      progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{args.split}: {result.tokens:,} tokens, {result.bytes:,} bytes, context {result.seq_len}")
    print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.2f} | "
          f"bits per byte {result.bits_per_byte:.4f}")
    print("loss by position in the context:")
    positions, p = [], 1
    while p <= result.seq_len:
        positions.append(p)
        p *= 2
    for p in positions:
        print(f"  position {p:>6}: {result.loss_by_position[p - 1]:.4f}")
    return 0
