"""Logits processors over a batch: a [B, V] float32 tensor whose rows each have their own
settings, changed in place. Each has a plain reference (`*_ref`) on one [V] row, the obvious
way; tests/decoding compares the two row by row.

The order (the sampler's, vLLM's): token constraint (grammar mask), logit bias, min_tokens,
repetition penalty, presence and frequency penalties; greedy rows take the argmax there;
sampled rows go on to temperature, top-k, top-p, min-p, softmax.

Settings shared by many rows (one temperature, one top-p: the usual batch) are applied as one
op on those rows with the value as a Python number, the very op the reference does on a row,
so a row's result never depends on the batch it is in (seeded sampling batched = alone).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from samout.decoding.constraint import bitmask_to_bool_ref

NEG_INF = float("-inf")


# -- references: one [V] row -------------------------------------------------------------
def logit_bias_ref(row: Tensor, bias: dict[int, float]) -> Tensor:
    row = row.clone()
    for token, value in bias.items():
        row[token] += value
    return row


def mask_ref(row: Tensor, tokens: Iterable[int]) -> Tensor:
    """`tokens` forbidden (min_tokens masks the stop ids this way)."""
    row = row.clone()
    for token in tokens:
        row[token] = NEG_INF
    return row


def repetition_penalty_ref(row: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: divide positive logits of tokens already seen by `penalty`, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return row
    row = row.clone()
    picked = row[seen]
    row[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return row


def presence_frequency_ref(row: Tensor, generated: Sequence[int], presence: float,
                           frequency: float) -> Tensor:
    """OpenAI's: logit -= frequency * count + presence, for each token generated `count` > 0 times."""
    row = row.clone()
    counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long), minlength=row.numel()).float()
    seen = counts > 0
    row[seen] -= counts[seen] * frequency + presence
    return row


def temperature_ref(row: Tensor, temperature: float) -> Tensor:
    # Shift so the largest logit is 0 before dividing: a tiny temperature then gives -inf
    # for the others (greedy in the limit) instead of inf - inf = nan.
    return (row - row.max()) / temperature


def top_k_ref(row: Tensor, k: int | None) -> Tensor:
    if k is None or k >= row.numel():
        return row
    kth = torch.topk(row, k).values[-1]
    return row.masked_fill(row < kth, NEG_INF)


def top_p_ref(row: Tensor, p: float | None) -> Tensor:
    """The smallest set of most likely tokens whose probability reaches `p` (always the first)."""
    if p is None or p >= 1.0:
        return row
    sorted_logits, order = torch.sort(row, descending=True)
    cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_logits, -1) >= p
    return row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG_INF)


def min_p_ref(row: Tensor, p: float) -> Tensor:
    """Tokens of probability below `p` times the most likely's dropped."""
    if p <= 0:
        return row
    probs = torch.softmax(row, -1)
    return row.masked_fill(probs < p * probs.max(), NEG_INF)


def constraint_ref(row: Tensor, bitmask_row: Tensor) -> Tensor:
    allowed = bitmask_to_bool_ref(bitmask_row.unsqueeze(0), row.numel())[0]
    return row.masked_fill(~allowed, NEG_INF)


# -- batched: x [B, V] in place; `rows` name the rows a setting applies to -----------------
_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(x: Tensor, rows: list[int], bitmask: Tensor) -> None:
    """Rows `rows` of `x` masked by the same rows of the packed int32 `bitmask` [B, words]
    (`samout.decoding.constraint.apply_bitmask_ref`). The bits are unpacked in int32 (an
    arithmetic shift keeps bit 0 right), and a batch whose rows are all constrained is masked
    in place: 4x faster than through int64 and row indexing at 32 rows of 8192."""
    if not rows:
        return
    vocab = x.shape[-1]
    if len(rows) == x.shape[0]:
        forbidden = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(x.shape[0], -1)[:, :vocab] == 0
        x.masked_fill_(forbidden, NEG_INF)
        return
    index = torch.tensor(rows)
    forbidden = ((bitmask[index].unsqueeze(-1) >> _BITS) & 1).view(len(rows), -1)[:, :vocab] == 0
    x[index] = x[index].masked_fill(forbidden, NEG_INF)


def apply_logit_bias(x: Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    flat, values = _flat_pairs(x, rows, [list(b) for b in biases]), [v for b in biases for v in b.values()]
    if flat.numel():
        x.view(-1).index_put_((flat,), torch.tensor(values, dtype=x.dtype), accumulate=True)


def apply_mask(x: Tensor, rows: list[int], tokens: list[Sequence[int]]) -> None:
    flat = _flat_pairs(x, rows, tokens)
    if flat.numel():
        x.view(-1)[flat] = NEG_INF


def apply_repetition_penalty(x: Tensor, rows: list[int], seen: list[Tensor], penalties: list[float]) -> None:
    """`seen[i]`: the token ids (int64) row `rows[i]` penalises (repeats are harmless)."""
    for penalty, members in _groups(penalties).items():
        if penalty == 1.0:
            continue
        flat = _flat_pairs(x, [rows[i] for i in members], [seen[i] for i in members])
        if flat.numel():
            view = x.view(-1)
            picked = view[flat]
            view[flat] = torch.where(picked > 0, picked / penalty, picked * penalty)


def apply_presence_frequency(x: Tensor, rows: list[int], counts: list[dict[int, int]],
                             presence: list[float], frequency: list[float]) -> None:
    """`counts[i]`: how often each token was generated in row `rows[i]`."""
    flat = _flat_pairs(x, rows, [list(c) for c in counts])
    if not flat.numel():
        return
    n = torch.tensor([v for c in counts for v in c.values()], dtype=x.dtype)
    sizes = [len(c) for c in counts]
    freq = torch.tensor(frequency, dtype=x.dtype).repeat_interleave(torch.tensor(sizes))
    pres = torch.tensor(presence, dtype=x.dtype).repeat_interleave(torch.tensor(sizes))
    view = x.view(-1)
    view[flat] -= n * freq + pres


def apply_temperature(x: Tensor, temperatures: list[float]) -> None:
    """Every row of `x` by its temperature (> 0)."""
    for t, members in _groups(temperatures).items():
        _each(x, members, lambda v, t=t: (v - v.max(-1, keepdim=True).values) / t)


def apply_top_k(x: Tensor, ks: list[int | None]) -> None:
    vocab = x.shape[-1]
    for k, members in _groups(ks).items():
        if k is None or k >= vocab:
            continue
        def top_k(v, k=k):
            kth = torch.topk(v, k, dim=-1).values[:, -1:]
            return v.masked_fill(v < kth, NEG_INF)
        _each(x, members, top_k)


def apply_top_p(x: Tensor, ps: list[float | None]) -> None:
    for p, members in _groups(ps).items():
        if p is None or p >= 1.0:
            continue
        def top_p(v, p=p):
            sorted_logits, order = torch.sort(v, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            drop = probs.cumsum(-1) - probs >= p
            return v.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)
        _each(x, members, top_p)


def apply_min_p(x: Tensor, ps: list[float]) -> None:
    for p, members in _groups(ps).items():
        if p <= 0:
            continue
        def min_p(v, p=p):
            probs = torch.softmax(v, -1)
            return v.masked_fill(probs < p * probs.max(-1, keepdim=True).values, NEG_INF)
        _each(x, members, min_p)


def _groups(values: list) -> dict:
    """value -> the indices holding it."""
    groups: dict = defaultdict(list)
    for i, v in enumerate(values):
        groups[v].append(i)
    return groups


def _each(x: Tensor, members: list[int], fn) -> None:
    """x[members] = fn(x[members]), without the gather when `members` is every row."""
    if len(members) == x.shape[0]:
        x.copy_(fn(x))
    else:
        index = torch.tensor(members)
        x[index] = fn(x[index])


def _flat_pairs(x: Tensor, rows: list[int], tokens: list) -> Tensor:
    """Flat indices into `x` of (rows[i], t) for t in tokens[i]."""
    vocab = x.shape[-1]
    parts = [torch.as_tensor(t, dtype=torch.long) + r * vocab for r, t in zip(rows, tokens) if len(t)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
