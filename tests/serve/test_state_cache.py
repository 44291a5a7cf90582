"""StateCache: longest exact proper-prefix lookup, packed states, LRU within the byte budget."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from samout.procmem import memory_stats
from samout.serve.state_cache import ENTRY_OVERHEAD_BYTES, StateCache
from samout.state import State


def _state(value: float, numel: int = 16) -> State:
    return State([{"running_max": torch.full((1, numel), value)}])


def _first(entry) -> float:
    return float(entry.state[0]["running_max"][0, 0])


def test_longest_proper_prefix_wins_and_only_exact_prefixes_hit():
    cache = StateCache(1 << 20)
    cache.put([1, 2, 3], _state(3.0))
    cache.put([1, 2, 3, 4, 5], _state(5.0))
    cache.put([9, 9], _state(9.0))
    hit = cache.lookup([1, 2, 3, 4, 5, 6, 7])
    assert hit.length == 5 and _first(hit) == 5.0
    assert cache.lookup([1, 2, 3, 4]).length == 3
    # A prompt equal to a cached prefix resumes before it: its last token must be fed to get
    # the next-token logits, which entries do not keep.
    assert cache.lookup([1, 2, 3, 4, 5]).length == 3
    assert cache.lookup([1, 2, 3]) is None
    assert cache.lookup([1, 2]) is None and cache.lookup([2, 2, 3, 4]) is None
    assert cache.hits == 3 and cache.misses == 3


def test_entries_own_their_memory_and_give_the_state_back_exactly():
    cache = StateCache(1 << 20)
    state = State([{"running_max": torch.randn(1, 4, 8)}, {"running_max": torch.randn(1, 4, 8),
                                                           "extra": torch.randn(1, 3)}])
    want = state.clone()
    cache.put([5, 6], state)
    for layer in state:
        for t in layer.values():
            t.fill_(7.0)
    got = cache.lookup([5, 6, 7]).state
    assert [list(layer) for layer in got] == [list(layer) for layer in want]
    assert all(torch.equal(got[i][k], want[i][k]) for i in range(2) for k in want[i])


def test_rejects_states_it_cannot_pack():
    cache = StateCache(1 << 20)
    with pytest.raises(ValueError, match="one sequence"):
        cache.put([1], State([{"running_max": torch.zeros(2, 4)}]))
    with pytest.raises(ValueError, match="one dtype"):
        cache.put([1], State([{"a": torch.zeros(1, 4), "b": torch.zeros(1, 4, dtype=torch.float64)}]))


def test_lru_eviction_keeps_within_budget():
    size = 16 * 4 + ENTRY_OVERHEAD_BYTES
    cache = StateCache(3 * size)
    for i in range(3):
        cache.put([i, 100], _state(float(i)))
    assert cache.nbytes == 3 * size
    assert cache.lookup([0, 100, 1]) is not None  # 0 is now the most recently used
    cache.put([3, 100], _state(3.0))  # evicts the least recently used: 1
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 3 and cache.evictions == 1
    assert cache.lookup([1, 100, 1]) is None
    assert all(cache.lookup([i, 100, 1]) is not None for i in (0, 2, 3))


def test_entry_larger_than_budget_is_not_stored():
    cache = StateCache(100)
    assert not cache.put([1, 2, 3], _state(0.0, numel=1000))
    assert len(cache) == 0 and cache.nbytes == 0


def test_replacing_an_entry_keeps_the_byte_count_exact():
    cache = StateCache(1 << 20)
    cache.put([1, 2], _state(0.0))
    first = cache.nbytes
    cache.put([1, 2], _state(1.0))
    assert cache.nbytes == first and len(cache) == 1
    assert _first(cache.lookup([1, 2, 3])) == 1.0


def _rss() -> int | None:
    return memory_stats()["rss_bytes"]


@pytest.mark.skipif(_rss() is None, reason="needs /proc/self/status")
def test_an_entry_costs_its_state_and_no_more_than_the_accounted_overhead():
    """What the cache claims an entry costs (its byte budget's unit) is what the process's
    resident memory grows by, whatever the length of the history: no ids, no logits are kept."""
    state = State([{"running_max": torch.randn(1, 8, 32)} for _ in range(4)])  # 4 KiB, the small preset's
    rng = np.random.default_rng(0)
    history = rng.integers(2, 8192, 4096).astype(np.int32)
    cache = StateCache(1 << 40)
    count = 4000
    gc.collect()
    before = _rss()
    for i in range(count):
        history[:2] = (i & 0xFFFF, i >> 16)
        cache.put(history, state)
    gc.collect()
    per_entry = (_rss() - before) / count
    assert state.nbytes <= per_entry <= state.nbytes + ENTRY_OVERHEAD_BYTES, per_entry
    assert cache.nbytes == count * (state.nbytes + ENTRY_OVERHEAD_BYTES)
    assert cache.mapped_bytes >= count * state.nbytes


def test_slots_are_reused_and_empty_maps_unmapped():
    state = State([{"running_max": torch.randn(1, 8, 32)} for _ in range(4)])
    per_map = (4 << 20) // state.nbytes
    cache = StateCache((per_map + 1) * (state.nbytes + ENTRY_OVERHEAD_BYTES))
    for i in range(per_map + 1):  # one more than a map holds: a second map
        cache.put([i, 1], state)
    assert cache.mapped_bytes == 2 * per_map * state.nbytes
    cache.put([per_map + 1, 1], state)  # evicts the oldest, and takes its slot: no third map
    assert cache.evictions == 1 and cache.mapped_bytes == 2 * per_map * state.nbytes
    # An entry of another shape evicts the only one of the first: its map goes back to the OS.
    small = StateCache(state.nbytes + ENTRY_OVERHEAD_BYTES)
    small.put([1, 2], state)
    other = State([{"running_max": torch.zeros(1, 8, 32)} for _ in range(3)])
    small.put([3, 4], other)
    assert len(small) == 1 and small.mapped_bytes == (4 << 20) // other.nbytes * other.nbytes
    assert torch.equal(small.lookup([3, 4, 5]).state[2]["running_max"], other[2]["running_max"])
