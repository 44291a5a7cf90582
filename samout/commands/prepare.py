"""`samout prepare [INPUT ...] --out DATA_DIR`: tokenizer + train/val token files."""

from __future__ import annotations

import argparse

from samout.commands import add_command
from samout.data.chat import DEFAULT_MAX_TOKENS, FORMATS, OVERLONG_RULES, prepare_conversations
from samout.data.prepare import DEFAULT_TOKENIZER_SAMPLE, prepare
from samout.data.prompts import prepare_prompts
from samout.data.shards import DEFAULT_SHARD_TOKENS
from samout.data.sources import BUILTIN_CORPORA, DEFAULT_CORPUS, TEXT_COLUMN
from samout.tokenizer import DEFAULT_VOCAB_SIZE

DESCRIPTION = (
    "Train (or reuse) a byte-level BPE tokenizer and write memory-mappable train and "
    "validation token shards plus meta.json, streaming: memory does not grow with the corpus. "
    "Inputs: text files, directories (recursive), globs, .jsonl files with a \"text\" field "
    "(text and JSONL may be .gz, .zst or .xz), Parquet files, data sets saved with "
    "datasets' save_to_disk or .arrow files (--text-column), or a built-in corpus "
    f"({', '.join(BUILTIN_CORPORA)}; default {DEFAULT_CORPUS})."
)


def register(subparsers) -> None:
    p = add_command(subparsers, "prepare", "tokenize a corpus into a data directory", DESCRIPTION)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=f"inputs (default: {DEFAULT_CORPUS})")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="output data directory")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"tokenizer vocabulary size, special tokens included (default: {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--tokenizer", metavar="tokenizer.json", help="use this tokenizer instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--format", choices=(*FORMATS, "prompts"), default="text",
                   help="text: documents; chat: JSONL lines {\"messages\": [{\"role\", \"content\"}, ...]} "
                        "rendered with the chat template, with a loss mask on assistant tokens; "
                        "dpo: JSONL lines "
                        "{\"prompt\": [messages], \"chosen\": TEXT, \"rejected\": TEXT}; "
                        "prompts: JSONL lines {\"messages\": [...], ...columns} for --objective grpo "
                        "(the columns reach the rewards)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="chat/dpo: longest rendered example in tokens; longer ones follow --overlong")
    p.add_argument("--overlong", choices=OVERLONG_RULES, default="drop",
                   help="chat: drop an over-long conversation, or truncate it to the longest run of whole "
                        "turns that ends with an assistant turn and fits (dpo always drops); reported")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: the cores available); the output is the same for any")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default: 2^27 = {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--text-column", default=TEXT_COLUMN,
                   help=f"the text field of JSONL, Parquet and data set rows (default: {TEXT_COLUMN})")
    p.add_argument("--tokenizer-sample", type=int, default=DEFAULT_TOKENIZER_SAMPLE, metavar="BYTES",
                   help="train the tokenizer on at most this much training text, a seeded sample "
                        f"(default: {DEFAULT_TOKENIZER_SAMPLE:,})")
    p.add_argument("--resume", action="store_true",
                   help="carry on an interrupted prepare from its last finished shard (same output)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "text":
        meta = prepare(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, seed=args.seed, quiet=args.quiet,
                       workers=args.workers, shard_tokens=args.shard_tokens, text_column=args.text_column,
                       tokenizer_sample=args.tokenizer_sample, resume=args.resume)
    elif args.format == "prompts":
        meta = prepare_prompts(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                               val_fraction=args.val_fraction, seed=args.seed, max_tokens=args.max_tokens,
                               quiet=args.quiet)
    else:
        meta = prepare_conversations(args.inputs, args.out, args.format, vocab_size=args.vocab_size,
                                     tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                                     max_tokens=args.max_tokens, overlong=args.overlong, quiet=args.quiet,
                                     shard_tokens=args.shard_tokens)
    s = meta["splits"]
    print(f"wrote {args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), "
          f"train {s['train']['tokens']:,} tokens / {s['train']['documents']} docs, "
          f"val {s['val']['tokens']:,} tokens / {s['val']['documents']} docs")
    return 0
