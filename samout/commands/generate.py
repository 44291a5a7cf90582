"""`samout generate RUN_DIR --prompt TEXT`: stream a continuation token by token."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from samout.commands import add_command
from samout.decoding.detokenizer import TextStream, token_bytes
from samout.device import DEVICE_HELP
from samout.errors import SamoutError
from samout.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    SamplingParams,
    encode_prompt,
    stream,
    stream_logprobs,
)
from samout.quant import add_dtype_argument
from samout.run_dir import load
from samout.tokenizer import end_ids

DESCRIPTION = (
    "Stream text from a run or model directory using the recurrent state "
    "(constant work per token). Without --prompt, generates from the start of a "
    "document (after <|endoftext|>)."
)


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
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="after each prompt's text, a table of every generated token's log-probability "
                        "and its N most likely alternatives (the model's raw distribution, before "
                        "temperature and penalties)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per generated token (with --logprobs, its logprobs) "
                        "and one per prompt's end, instead of the text")
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
    p.add_argument("--repetition-window", type=int, default=None, metavar="N",
                   help="the repetition penalty looks at the last N tokens only (default: all)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated (OpenAI's, [-2, 2])")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted once per earlier occurrence of a generated token (OpenAI's, [-2, 2])")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the most likely one")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_dtype_argument(p)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """SamplingParams fields from the flags of `add_sampling_flags`."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "repetition_window": args.repetition_window, "presence_penalty": args.presence_penalty,
            "frequency_penalty": args.frequency_penalty, "min_p": args.min_p}


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
    kwargs = {**sampling_kwargs(args), "logprobs": args.logprobs}
    params = [SamplingParams(**{**kwargs, "seed": None if args.seed is None else args.seed + i})
              for i in range(len(prompts))]
    schema = _read_json_schema(args.json_schema)
    model, tokenizer = load(args.run_dir, device=args.device, dtype=args.dtype)
    grammar = None
    if schema is not None:
        from samout.decoding.grammar import json_schema_constraint

        # Compiled now, so that a schema the engine rejects fails before any token.
        grammar = json_schema_constraint(tokenizer, schema, what=f"--json-schema {args.json_schema}")

    def constraint():  # one matcher per prompt, from its start
        return None if grammar is None else grammar.fresh()

    if args.json or args.logprobs is not None:
        for i, prompt in enumerate(prompts):
            _with_logprobs(model, tokenizer, i, prompt, params[i], args.json, constraint())
        return 0
    for i, prompt in enumerate(prompts):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        pieces = stream(model, tokenizer, prompt, constraint=constraint(), **dataclasses.asdict(params[i]))
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0


def _with_logprobs(model, tokenizer, index: int, prompt: str, params: SamplingParams, as_json: bool,
                   constraint=None) -> None:
    """One prompt's generation with a line per token: JSON, or the text then a table."""
    def name(token: int) -> str:
        raw = token_bytes(tokenizer, token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    text, rows = TextStream(tokenizer), []
    if not as_json:
        if index:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
    for token, lp in stream_logprobs(model, encode_prompt(tokenizer, prompt), params,
                                     stop_ids=end_ids(tokenizer), constraint=constraint):
        piece = text.add(token)
        if as_json:
            line = {"prompt": index, "token": token, "text": name(token)}
            if lp is not None:
                line["logprob"] = lp.logprob
                line["top_logprobs"] = [{"token": t, "text": name(t), "logprob": v} for t, v in lp.top]
            print(json.dumps(line, ensure_ascii=False), flush=True)
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
            rows.append((token, lp))
    piece = text.finish()
    if as_json:
        print(json.dumps({"prompt": index, "text": text.text}, ensure_ascii=False), flush=True)
        return
    print(piece)
    print(f"\n{'#':>4} {'id':>6}  {'token':<16} {'logprob':>9}  top")
    for n, (token, lp) in enumerate(rows):
        top = "  ".join(f"{name(t)!r} {v:.3f}" for t, v in lp.top)
        print(f"{n:>4} {token:>6}  {name(token)!r:<16} {lp.logprob:>9.4f}  {top}")
