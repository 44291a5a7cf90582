"""A KV cache that is written in place: the preallocated cache of the Transformer baseline
and of the hybrids' attention layers (issue 24).

    k = append_kv(cache_k, new_k, limit)   # [B, H, T, dh] + [B, H, t, dh] -> [B, H, T + t, dh]

The tensors a state holds are views of the first T slots of a capacity-sized buffer
(grown by a quarter), and a call whose cache is the buffer's longest view writes the new
keys and values into the free slots in place, so a decode step copies one token's keys,
not the whole cache. The state stays a plain functional value: a view never changes, and
a call from an older state (a shorter view of the same buffer: a branch, a cached prefix)
copies into a new buffer instead of writing over the slots a later state already uses.
Copies (`State.clone`, `stack`, `index_select`, left padding) are ordinary tensors and
start a new buffer on their next call. `torch.cat((cache, new), 2)` is the reference
(`set_kv_cache("concat")` on either model).
"""

from __future__ import annotations

import torch
from torch import Tensor

from samout.state import State

# Slots a KV buffer is rounded up to; a new one has room for a quarter more tokens than it
# holds (at least KV_BLOCK), up to the context limit.
KV_BLOCK = 64
KV_CACHES = ("preallocated", "concat")


def check_kv_cache(kind: str) -> str:
    """`kind` if it names a KV cache (KV_CACHES), else a one-line ValueError."""
    if kind not in KV_CACHES:
        raise ValueError(f"unknown kv cache {kind!r}: choose one of {', '.join(KV_CACHES)}")
    return kind


class KVBuffer:
    """Capacity-sized key or value storage [B, H, C, dh] shared by the cache views cut from
    it; `length` is how many slots hold data (the longest view handed out)."""

    __slots__ = ("data", "length")

    def __init__(self, data: Tensor, length: int) -> None:
        self.data, self.length = data, length

    def view(self) -> Tensor:
        v = self.data[:, :, :self.length]
        v._samout_kv_buffer = self  # how the next call finds the buffer behind the view
        return v


def kv_buffer(cache: Tensor) -> KVBuffer | None:
    """The buffer `cache` is the longest view of, if any (None: a plain tensor)."""
    return getattr(cache, "_samout_kv_buffer", None)


def append_kv(cache: Tensor | None, new: Tensor, limit: int | None = None) -> Tensor:
    """`cache` [B, H, T, dh] followed by `new` [B, H, t, dh], as a view of a preallocated
    buffer: written in place when `cache` is its buffer's longest view and room is left,
    else copied into a new buffer of T + t + max(KV_BLOCK, T / 4) slots rounded up to
    KV_BLOCK (at most `limit` if given, at least T + t): geometric growth, so each token is copied a
    bounded number of times on average (at most 5), against T times by concatenation, and
    at most a quarter of the buffer (or a block) is slack. Equal to torch.cat((cache, new), 2)
    in value."""
    past = 0 if cache is None else cache.shape[2]
    need = past + new.shape[2]
    buf = None if cache is None else kv_buffer(cache)
    if (buf is not None and buf.length == past and buf.data.shape[2] >= need
            and buf.data.dtype == new.dtype and buf.data.device == new.device
            and buf.data.shape[:2] == new.shape[:2]
            # a buffer made under torch.inference_mode can only be written under it
            and (not buf.data.is_inference() or torch.is_inference_mode_enabled())):
        buf.data[:, :, past:need].copy_(new)
    else:
        capacity = -(-(need + max(KV_BLOCK, past // 4)) // KV_BLOCK) * KV_BLOCK
        capacity = capacity if limit is None else max(need, min(capacity, limit))
        data = new.new_empty(*new.shape[:2], capacity, new.shape[3])
        if past:
            data[:, :, :past].copy_(cache)
        data[:, :, past:need].copy_(new)
        buf = KVBuffer(data, need)
    buf.length = need
    return buf.view()


def kv_capacity_bytes(state: State) -> int:
    """Bytes a state's KV caches hold, buffers counted at their capacity (each once)."""
    seen, total = set(), 0
    for layer in state:
        for t in layer.values():
            buf = kv_buffer(t)
            if buf is None:
                total += t.numel() * t.element_size()
            elif id(buf) not in seen:
                seen.add(id(buf))
                total += buf.data.numel() * buf.data.element_size()
    return total
