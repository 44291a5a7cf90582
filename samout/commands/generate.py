"""`samout generate RUN_DIR --prompt TEXT`: stream a continuation token by token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from samout.errors import SamoutError
from samout.generation import load_for_generation, stream


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a trained model",
        description="Stream text from a run or model directory using the recurrent state "
                    "(constant work per token).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run or model directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    p.add_argument("--prompts-file", metavar="FILE", help="a file with one prompt per line")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags of `samout generate` (shared with `samout chat`)."""
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (>1)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """SamplingParams fields from the flags of `add_sampling_flags`."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def run(args: argparse.Namespace) -> int:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SamoutError(f"prompts file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise SamoutError("give a prompt with --prompt TEXT or --prompts-file FILE")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    model, tokenizer = load_for_generation(args.run_dir, device=device if device != "auto" else "cpu")
    for i, prompt in enumerate(prompts):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        for piece in stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty,
                            seed=None if args.seed is None else args.seed + i):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0
