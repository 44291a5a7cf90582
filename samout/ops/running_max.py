"""The running maximum over time with an incoming state: SamOut's whole memory.

    m_t = max(S, s_1, ..., s_t)        new state = m_T

`running_max` is the path the model uses; `running_max_ref` is a plain loop over
time in float64 that documents the semantics. They agree exactly on values
(max is exact) and on gradients, including ties:

    On a tie, the gradient goes to the most recent position holding the maximum;
    the incoming state counts as older than every position of the chunk.

That rule is what `torch.cummax` does (it returns the latest index of a tie), and it
makes chunked calls route gradients exactly as one call on the whole sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor


def running_max(x: Tensor, state: Tensor | None = None, dim: int = 1) -> Tensor:
    """Inclusive running maximum of `x` along `dim`, continuing from `state`.

    x:     [..., T, ...] with time on `dim`.
    state: x's shape without `dim` (the running max before this call), or None.
    Returns a tensor shaped like x; its last slice along `dim` is the new state.
    """
    if x.shape[dim] == 1:
        # One-step form: no scan needed.
        out = x if state is None else _max_with_state(x, state.unsqueeze(dim))
        return out
    out = torch.cummax(x, dim=dim).values
    if state is not None:
        out = _max_with_state(out, state.unsqueeze(dim))
    return out


def _max_with_state(x: Tensor, state: Tensor) -> Tensor:
    # torch.maximum splits the gradient of a tie in halves; `where` with `>=` gives it
    # all to the chunk, which is the more recent side.
    return torch.where(x >= state, x, state)


def running_max_ref(x: Tensor, state: Tensor | None = None, dim: int = 1) -> Tensor:
    """Reference: a loop over time in float64. Slow, obviously correct, differentiable."""
    xt = x.movedim(dim, 0).to(torch.float64)
    m = None if state is None else state.to(torch.float64)
    outs = []
    for t in range(xt.shape[0]):
        # `>=`: a tie takes the newer value, so the gradient goes to the newer position.
        m = xt[t] if m is None else torch.where(xt[t] >= m, xt[t], m)
        outs.append(m)
    return torch.stack(outs, 0).movedim(0, dim).to(x.dtype)
