"""`samout bench grammar`: grammar engines for structured output on samout's byte-level BPE
vocabularies, on CPU: llguidance (what samout uses) or xgrammar (optional, for comparison).

For each vocabulary (byte-level BPE tokenizers trained on the shipped Shakespeare, with the
chat tokens; or --tokenizer FILE) it measures
  tokenizer   building the engine's tokenizer tables (once per tokenizer),
  compile     a JSON schema's compile time, to the first mask (once per request),
  mask        filling one sequence's next-token bitmask (every token),
  advance     telling the matcher the sampled token (every token),
  batch       filling the masks of all --batch sequences of a step, one after another,
and checks correctness: --batch outputs per schema sampled from random logits (seeded) must
all finish within --max-tokens and parse as JSON that validates against the schema
(jsonschema). Schemas: enums, nested objects, arrays, maxLength strings, numbers, booleans,
required and optional fields. Times are medians over all steps (mask, advance, batch) or
over --repeats compiles.

xgrammar is not a samout dependency: install it beside samout to compare
(`pip install xgrammar`; it needs transformers, torch, triton and apache-tvm-ffi).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from samout.bench.arguments import command_line, ints, set_threads
from samout.bench.common import header_lines, prepare_out_dir, run_header, write_json
from samout.decoding.constraint import apply_bitmask_ref, bitmask_words
from samout.errors import SamoutError
from samout.run_dir import atomic_write
from samout.tokenizer import EOT_ID

ENGINES = ("llguidance", "xgrammar")
SEPARATORS = (", ", ": ")  # samout.decoding.grammar.JSON_LAYOUT: json.dumps's, no other whitespace
SCHEMAS: dict[str, dict] = {
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "XL"]},
        "count": {"enum": [1, 2, 3, None]}},
        "required": ["color", "size", "count"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "maxLength": 5}},
                "required": ["city"], "additionalProperties": False}},
            "required": ["name", "age", "address"], "additionalProperties": False},
        "active": {"type": "boolean"}},
        "required": ["user", "active"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 4},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                              "minItems": 2, "maxItems": 2}, "maxItems": 3}},
        "required": ["tags", "matrix"], "additionalProperties": False},
    "scalars": {"type": "object", "properties": {
        "x": {"type": "number"}, "n": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 12},
        "title": {"type": "string", "maxLength": 20}},
        "required": ["x", "n", "ok", "title"], "additionalProperties": False},
}
QUICK = {"vocab_sizes": [400, 8192], "batch": 8, "repeats": 2}
DEFAULTS = {"vocab_sizes": [400, 8192, 32768], "batch": 32, "repeats": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="llguidance",
                        help="grammar engine (default: llguidance; xgrammar must be installed separately)")
    parser.add_argument("--vocab-sizes", type=ints,
                        help="byte-level BPE vocabularies to train and measure (default: 400,8192,32768)")
    parser.add_argument("--tokenizer", help="measure this tokenizer.json (or run directory) instead")
    parser.add_argument("--batch", type=int,
                        help="sequences sampled per schema, decoded together (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="tokens per output at most (default: 256)")
    parser.add_argument("--repeats", type=int, help="compiles timed per schema (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="vocabularies 400 and 8192, batch 8, 2 repeats")
    parser.add_argument("--out", help="also write grammar-<engine>.json and .md into this directory")
    parser.add_argument("--decode", action="store_true",
                        help="instead: tokens/s of an untrained --preset model's decode steps with and "
                             "without a schema (samout.bench.grammar_decode; llguidance only)")
    parser.add_argument("--preset", default="small", help="with --decode: the model preset (default: small)")
    parser.add_argument("--decode-batches", type=ints, default=[1, 32],
                        help="with --decode: batch sizes (default: 1,32)")
    parser.add_argument("--decode-steps", type=int, default=128,
                        help="with --decode: timed steps per run (default: 128)")


def run(args: argparse.Namespace) -> int:
    """`samout bench grammar`: print the table; with --out, write it as JSON and Markdown too."""
    settings = {**(QUICK if args.quick else DEFAULTS)}
    for name in ("vocab_sizes", "batch", "repeats"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if settings["batch"] < 1 or settings["repeats"] < 1 or args.max_tokens < 1:
        raise SamoutError("--batch, --repeats and --max-tokens must be positive")
    set_threads(args.threads)
    if args.decode:
        return run_decode(args, settings)
    engine = ENGINE_CLASSES[args.engine]()
    header = run_header(torch.device("cpu"), command_line(args))
    rows = []
    for name, tokenizer in tokenizers(args.tokenizer, settings["vocab_sizes"]):
        rows.append(measure(engine, name, tokenizer, settings["batch"], args.max_tokens, settings["repeats"],
                            args.seed))
    table = "\n".join(header_lines("grammar", header) + [format_rows(rows)])
    print(table)
    if args.out:
        out = prepare_out_dir(args.out)
        write_json(out / f"grammar-{args.engine}.json",
                   {"benchmark": "grammar", "engine": args.engine, "version": engine.version,
                    "header": header, "rows": rows})
        atomic_write(out / f"grammar-{args.engine}.md", table + "\n")
    return 0 if all(r["valid"] == r["outputs"] for r in rows) else 1


def run_decode(args: argparse.Namespace, settings: dict) -> int:
    """`--decode`: the table of samout.bench.grammar_decode (default vocabulary: 8192, the
    `small` preset's)."""
    from samout.bench.grammar_decode import SCHEMA_NAME, format_decode_rows, measure_decode

    if args.engine != "llguidance":
        raise SamoutError("--decode measures samout's own engine: --engine llguidance")
    if args.decode_steps < 1 or min(args.decode_batches) < 1:
        raise SamoutError("--decode-steps and --decode-batches must be positive")
    sizes = args.vocab_sizes or [8192]
    header = run_header(torch.device("cpu"), command_line(args))
    rows = []
    for name, tokenizer in tokenizers(args.tokenizer, sizes):
        rows += measure_decode(tokenizer, name, SCHEMAS[SCHEMA_NAME], args.preset, args.decode_batches,
                               args.decode_steps, settings["repeats"], args.seed)
    table = "\n".join(header_lines("grammar --decode", header) + [format_decode_rows(rows)])
    print(table)
    if args.out:
        out = prepare_out_dir(args.out)
        write_json(out / "grammar-decode.json",
                   {"benchmark": "grammar-decode", "header": header, "rows": rows})
        atomic_write(out / "grammar-decode.md", table + "\n")
    return 0


def tokenizers(path: str | None, vocab_sizes: list[int]):
    """(name, tokenizer): the one at `path`, or byte-level BPEs trained on Shakespeare."""
    if path is not None:
        from samout.tokenizer import load_tokenizer

        yield path, load_tokenizer(path)
        return
    from samout.data.sources import shakespeare_works
    from samout.tokenizer import train_tokenizer

    texts = list(shakespeare_works().values())
    for size in vocab_sizes:
        yield f"bpe-{size}", train_tokenizer(texts if size > 1000 else [texts[0][:100_000]], size, chat=True)


# -- the engines -------------------------------------------------------------------------

class LLGuidance:
    """samout's own path: samout.decoding.grammar."""

    name = "llguidance"

    def __init__(self) -> None:
        import llguidance

        self.version = llguidance.__version__

    def build_tokenizer(self, tokenizer) -> Any:
        from samout.decoding.grammar import grammar_tokenizer

        grammar_tokenizer(tokenizer, (EOT_ID,))  # a new tokenizer object: built (and cached) here
        return tokenizer

    def compile(self, built, schema: dict) -> Callable[[], Any]:
        from samout.decoding.grammar import json_schema_constraint

        first = json_schema_constraint(built, schema, eos_ids=[EOT_ID])
        return first.fresh

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_bitmask(bitmask, row)

    def advance(self, matcher, token: int) -> None:
        matcher.advance(token)

    def finished(self, matcher) -> bool:
        return matcher.is_finished()


class XGrammar:
    name = "xgrammar"

    def __init__(self) -> None:
        try:
            import xgrammar
        except Exception as err:  # noqa: BLE001  (missing, or one of its dependencies missing)
            raise SamoutError(f"--engine xgrammar needs xgrammar installed (pip install xgrammar): "
                              f"{type(err).__name__}: {err}") from None
        self.xgr = xgrammar
        from importlib.metadata import version

        self.version = version("xgrammar")

    def build_tokenizer(self, tokenizer) -> Any:
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
        info = self.xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tokenizer.get_vocab_size(),
                                                       stop_token_ids=[EOT_ID])
        return self.xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, compiler, schema: dict) -> Callable[[], Any]:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=SEPARATORS)
        first = self.xgr.GrammarMatcher(compiled)
        pending = [first]

        def fresh():
            return pending.pop() if pending else self.xgr.GrammarMatcher(compiled)
        return fresh

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, matcher, token: int) -> None:
        if not matcher.accept_token(token):
            raise SamoutError(f"xgrammar rejected token {token}, which its mask allowed")

    def finished(self, matcher) -> bool:
        return matcher.is_terminated()


ENGINE_CLASSES = {"llguidance": LLGuidance, "xgrammar": XGrammar}


# -- measuring ---------------------------------------------------------------------------

def _ms(ns: float) -> float:
    return ns / 1e6


def measure(engine, name: str, tokenizer, batch: int, max_tokens: int, repeats: int, seed: int) -> dict:
    try:
        import jsonschema
    except ModuleNotFoundError:
        raise SamoutError("samout bench grammar validates outputs with jsonschema: pip install jsonschema"
                          ) from None

    vocab = tokenizer.get_vocab_size()
    t0 = time.perf_counter_ns()
    built = engine.build_tokenizer(tokenizer)
    tokenizer_ms = _ms(time.perf_counter_ns() - t0)
    compile_ms, mask_ns, advance_ns, batch_ns = {}, [], [], []
    outputs = valid = finished_count = tokens_total = 0
    failures: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for schema_name, schema in SCHEMAS.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            fresh = engine.compile(built, schema)
            matcher = fresh()
            first_mask = torch.zeros(1, bitmask_words(vocab), dtype=torch.int32)
            engine.fill(matcher, first_mask, 0)  # timed to the first mask
            times.append(time.perf_counter_ns() - t0)
        compile_ms[schema_name] = _ms(statistics.median(times))
        matchers = [fresh() for _ in range(batch)]
        out: list[list[int]] = [[] for _ in range(batch)]
        mask = torch.zeros(batch, bitmask_words(vocab), dtype=torch.int32)
        for _step in range(max_tokens):
            live = [r for r in range(batch) if not engine.finished(matchers[r])]
            if not live:
                break
            t_batch = time.perf_counter_ns()
            for r in live:
                t0 = time.perf_counter_ns()
                engine.fill(matchers[r], mask, r)
                mask_ns.append(time.perf_counter_ns() - t0)
            if len(live) == batch:
                batch_ns.append(time.perf_counter_ns() - t_batch)
            logits = torch.randn(len(live), vocab, generator=gen) * 3
            probs = torch.softmax(apply_bitmask_ref(logits, mask[live]), -1)
            picks = torch.multinomial(probs, 1, generator=gen).flatten().tolist()
            for r, token in zip(live, picks):
                t0 = time.perf_counter_ns()
                engine.advance(matchers[r], token)
                advance_ns.append(time.perf_counter_ns() - t0)
                out[r].append(token)
        for r in range(batch):
            outputs += 1
            tokens_total += len(out[r])
            if not engine.finished(matchers[r]):
                failures.append(f"{schema_name}: not finished in {max_tokens} tokens")
                continue
            finished_count += 1
            body = out[r][:-1] if out[r] and out[r][-1] == EOT_ID else out[r]
            text = tokenizer.decode(body, skip_special_tokens=False)
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError) as err:
                failures.append(f"{schema_name}: {text!r}: {str(err).splitlines()[0]}")
    return {
        "tokenizer": name, "vocab_size": vocab, "tokenizer_ms": tokenizer_ms, "compile_ms": compile_ms,
        "mask_us": statistics.median(mask_ns) / 1e3, "mask_us_p99": _percentile(mask_ns, 0.99) / 1e3,
        "advance_us": statistics.median(advance_ns) / 1e3,
        "batch_ms": _ms(statistics.median(batch_ns)) if batch_ns else None, "batch": batch,
        "outputs": outputs, "finished": finished_count, "valid": valid, "tokens": tokens_total,
        "failures": failures[:5],
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def format_rows(rows: list[dict]) -> str:
    schemas = list(SCHEMAS)
    lines = [
        "| tokenizer | vocab | tokenizer build ms | compile ms (" + ", ".join(schemas) + ") | mask µs "
        "(median, p99) | advance µs | batch ms | valid JSON |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compiles = ", ".join(f"{r['compile_ms'][s]:.2f}" for s in schemas)
        batch = f"{r['batch_ms']:.2f} ({r['batch']} rows)" if r["batch_ms"] is not None else "-"
        lines.append(f"| {r['tokenizer']} | {r['vocab_size']} | {r['tokenizer_ms']:.1f} | {compiles} | "
                     f"{r['mask_us']:.1f}, {r['mask_us_p99']:.1f} | {r['advance_us']:.1f} | {batch} | "
                     f"{r['valid']}/{r['outputs']} |")
    for r in rows:
        for failure in r["failures"]:
            lines.append(f"# {r['tokenizer']} failure: {failure}")
    return "\n".join(lines)
