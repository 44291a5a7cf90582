"""Sampling with the recurrent state: the prompt is run once, then each new token costs one
step of the model on one token (for SamOut, O(1) work and memory; the prefix is never
recomputed). Works for any model with the contract `logits, state = model(ids, state)`,
including one whose state grows (a Transformer's KV cache).

    import samout
    from samout.generation import generate, stream
    model, tokenizer = samout.load("runs/demo")
    print(generate(model, tokenizer, "In the beginning", max_new_tokens=50, seed=0))
    for piece in stream(model, tokenizer, "And God said", temperature=0.8):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from samout.decoding.constraint import TokenConstraint
from samout.decoding.detokenizer import text_pieces
from samout.decoding.logprobs import TokenLogprob
from samout.decoding.params import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingParams
from samout.decoding.processors import repetition_penalty_ref, top_k_ref, top_p_ref
from samout.decoding.sampler import RowSampler, sample_one
from samout.errors import SamoutError
from samout.run_dir import load
from samout.tokenizer import EOT_ID, document_prefix, end_ids

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DEFAULT_TEMPERATURE", "SamplingParams", "apply_repetition_penalty",
           "encode_prompt", "filter_logits", "generate", "load_for_generation", "sample_next", "stream",
           "stream_ids", "stream_logprobs"]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: divide positive logits of tokens already seen by `penalty`, multiply negative
    ones (samout.decoding.processors.repetition_penalty_ref)."""
    return repetition_penalty_ref(logits, seen, penalty)


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`."""
    return top_p_ref(top_k_ref(logits, top_k), top_p)


def sample_next(logits: Tensor, seen: Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> int:
    """One token id from the logits [vocab] of the last position, `seen` the ids the
    repetition penalty looks at (kept for callers of the old API; samout.decoding.sampler)."""
    row = RowSampler(params, prompt=seen.tolist(), generator=generator)
    return sample_one(logits, row)[0]


@torch.no_grad()
def stream_logprobs(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams | None = None,
                    stop_ids: frozenset[int] = frozenset({EOT_ID}), *,
                    constraint: TokenConstraint | None = None,
                    **kwargs) -> Iterator[tuple[int, TokenLogprob | None]]:
    """Yield (token id, its `TokenLogprob` when `params.logprobs` is set, else None) one by one.
    The prompt is fed once; each step feeds only the last token. Stops before a token of
    `stop_ids` (the tokenizer's `end_ids`) if `params.stop_at_eot`, and once `constraint` (a
    grammar, one per sequence: `samout.decoding.grammar`) is complete."""
    params = params or SamplingParams(**kwargs)
    if not prompt_ids:
        raise SamoutError("the prompt is empty (it must hold at least one token)")
    model.eval()
    device = next(model.parameters()).device
    row = RowSampler(params, prompt=prompt_ids, stop_ids=stop_ids, constraint=constraint)
    logits, state = model(torch.tensor([prompt_ids], device=device), logits_to_keep=1)
    for _ in range(params.max_new_tokens):
        token, logprob = sample_one(logits[0, -1].cpu(), row)
        if row.is_stop(token):
            return
        row.accept(token)
        yield token, logprob
        if row.finished:
            return
        logits, state = model(torch.tensor([[token]], device=device), state=state)


def stream_ids(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams | None = None,
               stop_ids: frozenset[int] = frozenset({EOT_ID}), *, constraint: TokenConstraint | None = None,
               **kwargs) -> Iterator[int]:
    """Yield new token ids one by one (`stream_logprobs` without the logprobs)."""
    for token, _ in stream_logprobs(model, prompt_ids, params, stop_ids, constraint=constraint, **kwargs):
        yield token


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids after the tokenizer's document prefix (<|endoftext|> for samout's: documents
    start after it in the training stream, so an empty prompt samples a document from its
    start; see samout.tokenizer.document_prefix)."""
    return document_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False).ids


def stream(model: torch.nn.Module, tokenizer, prompt: str, *, constraint: TokenConstraint | None = None,
           **kwargs) -> Iterator[str]:
    """Yield text pieces as tokens are sampled (waiting where a UTF-8 character spans tokens).
    `constraint`: a grammar the continuation is held to (e.g. `json_schema_constraint`)."""
    tokens = stream_ids(model, encode_prompt(tokenizer, prompt), SamplingParams(**kwargs),
                        stop_ids=end_ids(tokenizer), constraint=constraint)
    yield from text_pieces(tokenizer, tokens)


def generate(model: torch.nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The continuation of `prompt` (without the prompt). Keyword arguments: `SamplingParams`."""
    return "".join(stream(model, tokenizer, prompt, **kwargs))


def load_for_generation(run_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Deprecated alias of `samout.load` (kept for one release)."""
    return load(run_dir, device, dtype=dtype)
