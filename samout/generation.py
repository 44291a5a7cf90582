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

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from samout.errors import SamoutError
from samout.run_dir import load
from samout.tokenizer import EOT_ID, document_prefix, end_ids

# The defaults of the API and of `samout generate`.
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_at_eot: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SamoutError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise SamoutError(f"temperature must be a finite number >= 0 (0 is greedy), "
                              f"got {self.temperature!r}")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise SamoutError(f"top_k must be an integer of at least 1, got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamoutError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
            raise SamoutError(f"repetition_penalty must be a finite number > 0, "
                              f"got {self.repetition_penalty!r}")
        if not isinstance(self.stop_at_eot, bool):
            raise SamoutError(f"stop_at_eot must be true or false, got {self.stop_at_eot!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise SamoutError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: divide positive logits of tokens already seen by `penalty`, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # always keeps the first
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_next(logits: Tensor, seen: Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> int:
    """One token id from the logits [vocab] of the last position."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # Shift so the largest logit is 0 before dividing: a tiny temperature then gives
    # -inf for the others (greedy in the limit) instead of inf - inf = nan.
    scaled = (logits - logits.max()) / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), -1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(torch.argmax(logits))  # degenerate logits (e.g. all -inf): the most likely token
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream_ids(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams | None = None,
               stop_ids: frozenset[int] = frozenset({EOT_ID}), **kwargs) -> Iterator[int]:
    """Yield new token ids one by one. The prompt is fed once; each step feeds only the last
    token. Stops before a token of `stop_ids` (the tokenizer's `end_ids`) if `params.stop_at_eot`."""
    params = params or SamplingParams(**kwargs)
    if not prompt_ids:
        raise SamoutError("the prompt is empty (it must hold at least one token)")
    model.eval()
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    seen = torch.tensor(prompt_ids, dtype=torch.long)
    logits, state = model(torch.tensor([prompt_ids], device=device), logits_to_keep=1)
    for _ in range(params.max_new_tokens):
        token = sample_next(logits[0, -1].cpu(), seen, params, generator)
        if token in stop_ids and params.stop_at_eot:
            return
        yield token
        seen = torch.cat([seen, torch.tensor([token])])
        logits, state = model(torch.tensor([[token]], device=device), state=state)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids after the tokenizer's document prefix (<|endoftext|> for samout's: documents
    start after it in the training stream, so an empty prompt samples a document from its
    start; see samout.tokenizer.document_prefix)."""
    return document_prefix(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False).ids


def stream(model: torch.nn.Module, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yield text pieces as tokens are sampled (waiting where a UTF-8 character spans tokens)."""
    pending: list[int] = []
    for token in stream_ids(model, encode_prompt(tokenizer, prompt), SamplingParams(**kwargs),
                            stop_ids=end_ids(tokenizer)):
        pending.append(token)
        text = tokenizer.decode(pending, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            yield text
            pending = []
    if pending:
        yield tokenizer.decode(pending, skip_special_tokens=True)


def generate(model: torch.nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The continuation of `prompt` (without the prompt). Keyword arguments: `SamplingParams`."""
    return "".join(stream(model, tokenizer, prompt, **kwargs))


def load_for_generation(run_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Deprecated alias of `samout.load` (kept for one release)."""
    return load(run_dir, device, dtype=dtype)
