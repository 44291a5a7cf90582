"""Small helpers shared by several test modules."""

from __future__ import annotations

import random


def random_chunks(total: int, rng: random.Random, max_cuts: int = 8) -> list[int]:
    """Lengths of a random split of `total` positions into 2..max_cuts+1 chunks (each >= 1)."""
    cuts = sorted(rng.sample(range(1, total), k=rng.randint(1, min(max_cuts, total - 1))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]
