"""The preallocated KV cache: equal to concatenation, written in place only when safe."""

import torch

from samout.layers.kv_cache import KV_BLOCK, append_kv, kv_buffer, kv_capacity_bytes
from samout.state import State


def _kv(t: int) -> torch.Tensor:
    return torch.randn(2, 3, t, 4)


def test_equals_concatenation_and_grows_by_a_quarter(seed):
    parts = [_kv(n) for n in (5, 1, 1, 70, 1, 300)]
    cache, expected = None, None
    for part in parts:
        cache = append_kv(cache, part)
        expected = part if expected is None else torch.cat((expected, part), 2)
        assert torch.equal(cache, expected)
        capacity = kv_buffer(cache).data.shape[2]
        assert capacity % KV_BLOCK == 0 and cache.shape[2] <= capacity
    assert kv_buffer(cache).data.shape[2] == 448  # 78 + 300 = 378, + max(a block, 78 // 4), in blocks


def test_decode_writes_in_place_and_limit_caps_the_buffer(seed):
    cache = append_kv(None, _kv(10), limit=20)
    buffer = kv_buffer(cache)
    assert buffer.data.shape[2] == 20
    for _ in range(10):
        cache = append_kv(cache, _kv(1), limit=20)
    assert kv_buffer(cache) is buffer and cache.data_ptr() == buffer.data.data_ptr()
    grown = append_kv(cache, _kv(1), limit=20)  # past the limit: still correct, a new buffer
    assert grown.shape[2] == 21 and kv_buffer(grown) is not buffer


def test_an_older_view_is_never_written_over(seed):
    prefix = append_kv(None, _kv(8))
    snapshot = prefix.clone()
    a = append_kv(prefix, _kv(2))  # in place: prefix was the longest view
    b_new = _kv(3)
    b = append_kv(prefix, b_new)  # prefix is no longer the longest view: a copy
    assert kv_buffer(b) is not kv_buffer(a)
    assert torch.equal(prefix, snapshot) and torch.equal(a[:, :, :8], snapshot)
    assert torch.equal(b, torch.cat((snapshot, b_new), 2))


def test_capacity_bytes_counts_each_buffer_once(seed):
    k, v = append_kv(None, _kv(10)), append_kv(None, _kv(10))
    plain = _kv(3)
    state = State([{"key": k, "value": v}, {"key": plain, "value": plain.clone()}])
    per_buffer = 2 * 3 * 128 * 4 * 4  # 10 + a block of room, in blocks: 128 slots of 4 float32
    assert kv_capacity_bytes(state) == 2 * per_buffer + 2 * plain.numel() * 4
    assert state.nbytes < kv_capacity_bytes(state)
