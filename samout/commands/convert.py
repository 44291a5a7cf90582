"""`samout convert openash WEIGHTS.pth --vocab VOCAB.json --out RUN_DIR`: import other formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from samout.commands import add_command

DESCRIPTION = (
    "Import a model published in another format as a samout run directory "
    "(config.json, model.safetensors, tokenizer, checksums) that every samout command "
    "and Hugging Face's Auto classes load."
)


def register(subparsers) -> None:
    p = add_command(subparsers, "convert", "import a model published in another format", DESCRIPTION)
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    o = sub.add_parser(
        "openash",
        help="the seed author's OpenASH models (dfytensor/OpenASH *.pth + open_ash_voc_agent.json)",
        description="Convert an OpenASH state dict (e.g. full_sft_768_12.pth, loaded safely with "
                    "weights_only=True) and its jieba vocabulary into a samout run directory. The "
                    "tokenizer needs jieba: pip install 'samout[zh]'.",
    )
    o.add_argument("weights", metavar="WEIGHTS.pth", help="the author's state dict")
    o.add_argument("--vocab", required=True, metavar="VOCAB.json", help="open_ash_voc_agent.json")
    o.add_argument("--out", required=True, metavar="RUN_DIR", help="directory to write")
    o.set_defaults(func=run_openash)


def run_openash(args: argparse.Namespace) -> int:
    from samout.convert.openash import convert_openash  # imported here: it pulls in the model code

    print(f"converting {args.weights} ...", flush=True)
    model = convert_openash(args.weights, args.vocab, args.out)
    c = model.config
    print(f"wrote {Path(args.out)}: openash, vocab {c.vocab_size}, hidden {c.hidden_size}, "
          f"{c.num_layers} layers, {c.num_heads} heads, {model.num_parameters():,} parameters")
    return 0
