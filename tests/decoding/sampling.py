"""A plain sampling loop for the grammar tests: random (or a tiny model's) logits, the
reference mask, multinomial with a seeded generator. Independent of samout's decoding core."""

from __future__ import annotations

import torch

from samout.decoding.constraint import apply_bitmask_ref, bitmask_words


def sample_constrained(constraints, vocab_size: int, max_tokens: int, seed: int = 0,
                       logits_fn=None, temperature: float = 1.0, bias: dict[int, float] | None = None
                       ) -> list[list[int]]:
    """Each constraint's tokens, sampled in one batch until it is finished or has
    `max_tokens`. logits_fn(step, tokens) -> float [batch, vocab] (default: N(0, 3^2) logits);
    bias: added to some tokens' logits (e.g. to make an end token likelier)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(constraints)
    out: list[list[int]] = [[] for _ in range(batch)]
    live = list(range(batch))
    mask = torch.zeros(batch, bitmask_words(vocab_size), dtype=torch.int32)
    for step in range(max_tokens):
        live = [r for r in live if not constraints[r].is_finished()]
        if not live:
            break
        if logits_fn is None:
            logits = torch.randn(batch, vocab_size, generator=gen) * 3
        else:
            logits = logits_fn(step, out)
        for token, value in (bias or {}).items():
            logits[:, token] += value
        for r in live:
            constraints[r].fill_bitmask(mask, r)
        probs = torch.softmax(apply_bitmask_ref(logits[live] / temperature, mask[live]), -1)
        picks = torch.multinomial(probs, 1, generator=gen).flatten().tolist()
        for r, token in zip(live, picks):
            constraints[r].advance(token)
            out[r].append(token)
    return out
