"""`samout chat-eval RUN_DIR --sft FILE --dpo FILE`: exact match, end-of-turn rate, preference accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samout.chat.evaluate import evaluate_chat
from samout.chat.template import load_chat_template
from samout.commands import add_command
from samout.errors import SamoutError
from samout.run_dir import load
from samout.tokenizer import TOKENIZER_NAME, has_chat_tokens, load_tokenizer

SUMMARY = "exact-match accuracy, end-of-turn rate and preference accuracy of a chat model"
DESCRIPTION = (
    "Greedy replies to held-out conversations (--sft, chat JSONL: the last assistant turn is "
    "the answer) scored by exact match and by whether they end with <|end|>; held-out "
    "preference pairs (--dpo, DPO JSONL) scored by whether the chosen reply is more likely."
)


def register(subparsers) -> None:
    p = add_command(subparsers, "chat-eval", SUMMARY, DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--sft", metavar="FILE.jsonl", help="held-out conversations")
    p.add_argument("--dpo", metavar="FILE.jsonl", help="held-out preference pairs")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples of each file")
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply length limit")
    p.add_argument("--tokenizer-from", metavar="DATA_DIR",
                   help="for a model without chat tokens (before SFT): take the tokenizer of this chat data "
                        "directory and grow the embedding as `train --init-from` does")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.sft and not args.dpo:
        raise SamoutError("give --sft FILE and/or --dpo FILE")
    model, tokenizer = load(args.run_dir, args.device)
    template = load_chat_template(args.run_dir)
    if args.tokenizer_from:
        from samout.data.dataset import TokenData
        from samout.training.init_from import check_tokenizers, grow_vocab

        data = TokenData(args.tokenizer_from)
        check_tokenizers(Path(args.run_dir), data.tokenizer_path)
        tokenizer = load_tokenizer(data.tokenizer_path)
        model = grow_vocab(model, data.vocab_size).to(args.device)
        template = load_chat_template(args.tokenizer_from)
    elif not has_chat_tokens(tokenizer):
        raise SamoutError(f"{Path(args.run_dir) / TOKENIZER_NAME} has no chat tokens: train with --objective "
                          "sft, or pass --tokenizer-from CHAT_DATA_DIR")
    result = evaluate_chat(model, tokenizer, template, args.sft, args.dpo, args.limit, args.max_new_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0
