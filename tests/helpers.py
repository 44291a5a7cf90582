"""Small helpers shared by several test modules."""

from __future__ import annotations

import random


def random_chunks(total: int, rng: random.Random, max_cuts: int = 8) -> list[int]:
    """Lengths of a random split of `total` positions into 2..max_cuts+1 chunks (each >= 1)."""
    cuts = sorted(rng.sample(range(1, total), k=rng.randint(1, min(max_cuts, total - 1))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


# Layer kinds and options the model contract tests run over (issue 14): today's maxstate
# layers, the forgetting running max, and hybrids with full and sliding-window attention
# (in both orders, so a state may start with either kind). For 2-layer models.
MODEL_VARIANTS: dict[str, dict] = {
    "maxstate": {},
    "decay": {"max_decay": True, "max_decay_init": 0.05},
    "hybrid": {"layer_types": ["maxstate", "attention"]},
    "hybrid-swa": {"layer_types": ["attention", "maxstate"], "attention_window": 5, "max_decay": True},
}
