"""A cumulative max that ONNX can express: the doubling (Hillis-Steele) scan.

ONNX has no cumulative max, so a graph computes it as ceil(log2(T)) rounds of "max with
the copy shifted by 1, 2, 4, ... steps, padded with -inf" (the identity of max). Max is
exact, so the result equals `torch.cummax(x, dim).values` bit for bit, ties and -inf
included (tests/ops/test_doubling_max.py).

`cummax_values` is what the model calls wherever it needs those values: eager code and
torch.compile get `torch.cummax`; an ONNX export gets the doubling scan. A graph has a
fixed number of rounds, so a graph with a symbolic time length needs an upper bound on
that length: `export_length_bound(n)` declares it for the duration of an export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

# The longest sequence an exported graph must handle (None: lengths are static).
_LENGTH_BOUND: ContextVar[int | None] = ContextVar("samout_export_length_bound", default=None)


def doubling_max(x: Tensor, dim: int, max_len: int | None = None) -> Tensor:
    """Inclusive cumulative max along `dim` with doubling shifts; equals `torch.cummax(x, dim).values`.

    A static length needs ceil(log2(n)) rounds; a symbolic one (while exporting) gets
    enough rounds for `max_len` positions.
    """
    n = x.shape[dim]
    length = n if isinstance(n, int) else max_len
    if length is None:
        raise ValueError("doubling_max on a symbolic length needs max_len (see export_length_bound)")
    if isinstance(n, int) and max_len is not None and n > max_len:
        raise ValueError(f"doubling_max: length {n} exceeds max_len {max_len}")
    y = x.movedim(dim, -1)
    shift = 1
    for _ in range(max(0, (length - 1).bit_length())):
        # Shift right by `shift` positions, filling with -inf (the identity of max).
        shifted = F.pad(y, (shift, 0), value=float("-inf"))[..., :n]
        y = torch.maximum(y, shifted)
        shift *= 2
    return y.movedim(-1, dim)


def cummax_values(x: Tensor, dim: int) -> Tensor:
    """`torch.cummax(x, dim).values`, as the doubling scan while exporting to ONNX."""
    if torch.onnx.is_in_onnx_export():
        return doubling_max(x, dim, _LENGTH_BOUND.get())
    return torch.cummax(x, dim=dim).values


@contextlib.contextmanager
def export_length_bound(max_len: int) -> Iterator[None]:
    """Within the block, an exported cumulative max handles sequences up to `max_len` long."""
    token = _LENGTH_BOUND.set(max_len)
    try:
        yield
    finally:
        _LENGTH_BOUND.reset(token)
