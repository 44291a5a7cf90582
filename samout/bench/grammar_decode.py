"""`samout bench grammar --decode`: what a JSON schema costs a decode step, end to end.

An untrained model of a preset (default `small`) decodes batches of --decode-batches rows for
--decode-steps steps, sampled at temperature 1 by samout's decoding core
(`samout.decoding.sampler.sample`), each row either unconstrained (its end token ignored, so
the batch stays full) or held to the "nested" schema of `samout bench grammar` (a row whose
JSON is complete starts a fresh one at once, so the batch stays full too). Per step it times
the model call, the core's sampling (with the mask: `process`, then the draw) and, inside it,
the grammar's mask filling (every row's `fill_bitmask`), and reports tokens/s. Plain and
constrained runs take turns, repeat --repeats times, and the medians are reported: the
machine may be shared, so the per-step mask time says what the grammar costs on its own.
"""

from __future__ import annotations

import statistics
import time

import torch

from samout.decoding.params import SamplingParams
from samout.decoding.sampler import RowSampler, sample

WARMUP_STEPS = 4
SCHEMA_NAME = "nested"


class _Timed:
    """A constraint whose mask filling is timed (ns, summed into `clock[0]`)."""

    __slots__ = ("inner", "clock")

    def __init__(self, inner, clock: list[int]) -> None:
        self.inner, self.clock = inner, clock

    def fill_bitmask(self, bitmask, row):
        start = time.perf_counter_ns()
        self.inner.fill_bitmask(bitmask, row)
        self.clock[0] += time.perf_counter_ns() - start

    def advance(self, token):
        self.inner.advance(token)

    def is_finished(self):
        return self.inner.is_finished()


@torch.no_grad()
def decode_once(model, tokenizer, grammar, batch: int, steps: int, seed: int) -> dict:
    """One timed decode: per-step medians (ms) of the model call, sampling and mask filling,
    and tokens/s over the timed steps."""
    prompt = tokenizer.encode("Describe a person as JSON:", add_special_tokens=False).ids or [0]
    clock = [0]
    eos = grammar.tokenizer.eos_ids if grammar is not None else ()

    def row(i: int, n: int) -> RowSampler:
        params = SamplingParams(temperature=1.0, seed=seed * 1000 + i * 100 + n, max_new_tokens=10**9,
                                stop_at_eot=grammar is not None)
        constraint = None if grammar is None else _Timed(grammar.fresh(), clock)
        return RowSampler(params, stop_ids=eos or {0}, constraint=constraint)

    rows = [row(i, 0) for i in range(batch)]
    restarts = [0] * batch
    logits, state = model(torch.tensor([prompt] * batch), logits_to_keep=1)
    forward, sampling, masks, total = [], [], [], 0.0
    for step in range(WARMUP_STEPS + steps):
        clock[0] = 0
        t0 = time.perf_counter()
        tokens, _ = sample(logits[:, -1].float().cpu(), rows)
        t1 = time.perf_counter()
        for i, token in enumerate(tokens):
            if rows[i].is_stop(token):
                restarts[i] += 1
                rows[i] = row(i, restarts[i])
                continue
            rows[i].accept(token)
            if rows[i].finished:
                restarts[i] += 1
                rows[i] = row(i, restarts[i])
        mask_ns = clock[0]
        t2 = time.perf_counter()
        logits, state = model(torch.tensor(tokens).unsqueeze(1), state=state)
        t3 = time.perf_counter()
        if step >= WARMUP_STEPS:
            sampling.append(t1 - t0)
            forward.append(t3 - t2)
            masks.append(mask_ns / 1e9)
            total += t3 - t0
    return {"forward_ms": 1e3 * statistics.median(forward), "sample_ms": 1e3 * statistics.median(sampling),
            "mask_ms": 1e3 * statistics.median(masks), "tokens_per_s": batch * steps / total,
            "outputs": sum(restarts)}


def measure_decode(tokenizer, name: str, schema: dict, preset: str, batches: list[int], steps: int,
                   repeats: int, seed: int) -> list[dict]:
    """Rows of (batch, plain or schema) medians over `repeats` interleaved runs."""
    from samout import SamOut, SamOutConfig
    from samout.decoding.grammar import json_schema_constraint

    torch.manual_seed(seed)
    model = SamOut(SamOutConfig.from_preset(preset, vocab_size=tokenizer.get_vocab_size())).eval()
    grammar = json_schema_constraint(tokenizer, schema)
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(repeats):
        for batch in batches:
            for mode in ("plain", "schema") if r % 2 == 0 else ("schema", "plain"):
                got = decode_once(model, tokenizer, grammar if mode == "schema" else None, batch, steps,
                                  seed + r)
                runs.setdefault((batch, mode), []).append(got)
    rows = []
    for (batch, mode), got in runs.items():
        rows.append({"tokenizer": name, "vocab_size": tokenizer.get_vocab_size(), "preset": preset,
                     "batch": batch, "mode": mode, "steps": steps, "repeats": repeats,
                     **{k: statistics.median(g[k] for g in got)
                        for k in ("tokens_per_s", "forward_ms", "sample_ms", "mask_ms")},
                     "outputs": sum(g["outputs"] for g in got)})
    return sorted(rows, key=lambda x: (x["batch"], x["mode"]))


def format_decode_rows(rows: list[dict]) -> str:
    lines = ["| tokenizer | preset | batch | rows | tokens/s | model call ms | sampling ms "
             "| of which masks ms | JSON outputs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = f"schema ({SCHEMA_NAME})" if r["mode"] == "schema" else "unconstrained"
        lines.append(f"| {r['tokenizer']} | {r['preset']} | {r['batch']} | {mode} | "
                     f"{r['tokens_per_s']:.0f} | {r['forward_ms']:.2f} | {r['sample_ms']:.2f} | "
                     f"{r['mask_ms']:.2f} | "
                     f"{r['outputs'] if r['mode'] == 'schema' else '-'} |")
    return "\n".join(lines)
