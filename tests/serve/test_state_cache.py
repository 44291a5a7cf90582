"""StateCache: longest exact-prefix lookup, LRU within the byte budget."""

from __future__ import annotations

import torch

from samout.serve.state_cache import StateCache
from samout.state import State


def _state(value: float, numel: int = 16) -> State:
    return State([{"running_max": torch.full((1, numel), value)}])


def _entry_bytes(cache: StateCache, tokens: list[int]) -> int:
    return cache.lookup(tokens).nbytes


def test_longest_prefix_wins_and_only_exact_prefixes_hit():
    cache = StateCache(1 << 20)
    cache.put([1, 2, 3], _state(3.0), torch.zeros(8))
    cache.put([1, 2, 3, 4, 5], _state(5.0), torch.ones(8))
    cache.put([9, 9], _state(9.0), torch.zeros(8))
    hit = cache.lookup([1, 2, 3, 4, 5, 6, 7])
    assert hit.tokens.tolist() == [1, 2, 3, 4, 5] and float(hit.state[0]["running_max"][0, 0]) == 5.0
    assert torch.equal(hit.logits, torch.ones(8))
    assert cache.lookup([1, 2, 3, 4]).tokens.tolist() == [1, 2, 3]
    assert cache.lookup([1, 2, 3]).tokens.tolist() == [1, 2, 3]  # the whole prompt may be cached
    assert cache.lookup([1, 2]) is None and cache.lookup([2, 2, 3, 4]) is None
    assert cache.hits == 3 and cache.misses == 2


def test_entries_own_their_memory():
    cache = StateCache(1 << 20)
    state, logits = _state(1.0), torch.zeros(4)
    cache.put([5, 6], state, logits)
    state[0]["running_max"].fill_(7.0)
    logits.fill_(3.0)
    hit = cache.lookup([5, 6])
    assert float(hit.state[0]["running_max"].max()) == 1.0 and float(hit.logits.max()) == 0.0


def test_lru_eviction_keeps_within_budget():
    probe = StateCache(1 << 20)
    probe.put([1, 2], _state(0.0), torch.zeros(8))
    size = _entry_bytes(probe, [1, 2])
    cache = StateCache(3 * size)
    for i in range(3):
        cache.put([i, 100], _state(float(i)), torch.zeros(8))
    assert cache.lookup([0, 100]) is not None  # 0 is now the most recently used
    cache.put([3, 100], _state(3.0), torch.zeros(8))  # evicts the least recently used: 1
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 3 and cache.evictions == 1
    assert cache.lookup([1, 100]) is None
    assert all(cache.lookup([i, 100]) is not None for i in (0, 2, 3))


def test_entry_larger_than_budget_is_not_stored():
    cache = StateCache(100)
    assert not cache.put([1, 2, 3], _state(0.0, numel=1000), torch.zeros(8))
    assert len(cache) == 0 and cache.nbytes == 0


def test_replacing_an_entry_keeps_the_byte_count_exact():
    cache = StateCache(1 << 20)
    cache.put([1, 2], _state(0.0), torch.zeros(8))
    first = cache.nbytes
    cache.put([1, 2], _state(1.0), torch.zeros(8))
    assert cache.nbytes == first and len(cache) == 1
    assert float(cache.lookup([1, 2]).state[0]["running_max"][0, 0]) == 1.0
