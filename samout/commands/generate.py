"""`samout generate RUN_DIR --prompt TEXT`: stream a continuation token by token."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from samout.commands import add_command
from samout.device import DEVICE_HELP
from samout.errors import SamoutError
from samout.generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingParams, stream
from samout.quant import add_dtype_argument
from samout.run_dir import load

DESCRIPTION = (
    "Stream text from a run or model directory using the recurrent state "
    "(constant work per token). Without --prompt, generates from the start of a "
    "document (after <|endoftext|>)."
)


JSON_SCHEMA_PENDING = ("--json-schema: the schema is valid, but constrained sampling needs the batched "
                       "decoding core, which this build does not have yet")


def _read_json_schema(path: str | None) -> dict | None:
    """--json-schema FILE, read and checked before anything is loaded."""
    if path is None:
        return None
    from samout.decoding.grammar import load_json_schema

    return load_json_schema(path)


def register(subparsers) -> None:
    p = add_command(subparsers, "generate", "generate text from a trained model", DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run or model directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    p.add_argument("--prompts-file", metavar="FILE", help="a file with one prompt per line")
    p.add_argument("--json-schema", metavar="FILE",
                   help="structured output: each continuation is one JSON value valid against this JSON "
                        "schema (see docs/serving.md, Structured output)")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling, device and --dtype flags of `samout generate` (shared with `samout chat`)."""
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens (>1)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_dtype_argument(p)


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
        prompts = [""]  # unconditional: a document from its start
    # Checked before anything is printed or loaded.
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             seed=None if args.seed is None else args.seed + i) for i in range(len(prompts))]
    schema = _read_json_schema(args.json_schema)
    model, tokenizer = load(args.run_dir, device=args.device, dtype=args.dtype)
    if schema is not None:
        from samout.decoding.grammar import json_schema_constraint

        # Compiled now, so that a schema the engine rejects fails before any token.
        json_schema_constraint(tokenizer, schema, what=f"--json-schema {args.json_schema}")
        # INTEGRATION POINT (s22-core): pass a fresh constraint per prompt to the sampler,
        # `stream(..., constraint=...)` -> `RowSampler(params, constraint=...)`, and drop this error.
        raise SamoutError(JSON_SCHEMA_PENDING)
    for i, prompt in enumerate(prompts):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        for piece in stream(model, tokenizer, prompt, **dataclasses.asdict(params[i])):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0
