"""The running maximum over time with an incoming state, in its plain forms.

    m_t = max(S, s_1, ..., s_t)        new state = m_T

- `running_max_ref`: a plain loop over time in float64 that documents the semantics.
- `running_max_cummax`: the eager form, `torch.cummax` plus a `where` for the state. The
  "reference" kernel and graphs (tracing, compilation) use it; while exporting to ONNX its
  cumulative max is the doubling scan of `samout.ops.doubling_max`.

With a decay (`max_decay`, a forgetting running max) every function takes `decay` δ ≥ 0,
broadcastable to the state's shape (one per channel):

    m_t = max(x_t, m_{t-1} - δ)  =  max over s <= t of (x_s + s δ)  -  t δ

a running max of the shifted sequence u_s = x_s + s δ (the incoming state S enters as
u_{-1} = S - δ). Positions s are counted from the start of a piece of at most
`DECAY_CHUNK` steps, and each piece hands its last value to the next as the state, so the
shift never exceeds DECAY_CHUNK δ whatever the length: float32 keeps its precision on long
sequences. Any chunking gives the same values up to float rounding (the pieces fall at
other places); without a decay (None) nothing of this runs, so the plain max is unchanged
bit for bit, and δ = 0 gives the same bits too (u = x + 0, m = M - 0).

Every backend agrees exactly on values (max is exact) and on gradients to rounding, ties
included:

    On a tie, the gradient goes to the most recent position holding the maximum;
    the incoming state counts as older than every position of the chunk.

That rule is what `torch.cummax` does (it returns the latest index of a tie), and it
makes chunked calls route gradients exactly as one call on the whole sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samout.ops.doubling_max import cummax_values
from samout.ops.tracing import is_tracing

# Pieces of DECAY_CHUNK steps: inside a piece the shift s δ stays below DECAY_CHUNK δ, so
# x_s + s δ loses no more float32 precision than x_s itself at any sequence length.
DECAY_CHUNK = 256


def decay_pieces(t: int) -> list[tuple[int, int]]:
    """The [start, end) pieces of DECAY_CHUNK steps a forgetting max of length t is cut into."""
    return [(a, min(t, a + DECAY_CHUNK)) for a in range(0, t, DECAY_CHUNK)]


def running_max_ref(x: Tensor, state: Tensor | None = None, dim: int = 1,
                    decay: Tensor | None = None) -> Tensor:
    """Reference: a loop over time in float64. Slow, obviously correct, differentiable.
    With a decay: m_t = max(x_t, m_{t-1} - δ), the recurrence itself."""
    xt = x.movedim(dim, 0).to(torch.float64)
    m = None if state is None else state.to(torch.float64)
    d = None if decay is None else decay.to(torch.float64)
    outs = []
    for t in range(xt.shape[0]):
        if m is not None and d is not None:
            m = m - d
        # `>=`: a tie takes the newer value, so the gradient goes to the newer position.
        m = xt[t] if m is None else torch.where(xt[t] >= m, xt[t], m)
        outs.append(m)
    return torch.stack(outs, 0).movedim(0, dim).to(x.dtype)


def running_max_cummax(x: Tensor, state: Tensor | None = None, dim: int = 1,
                       decay: Tensor | None = None) -> Tensor:
    """The eager form: `torch.cummax` (autograd saves its int64 indices for backward).
    With a decay: the same on the shifted sequence, in pieces of DECAY_CHUNK steps
    (one piece under tracing, where a graph cannot loop over a symbolic length)."""
    if decay is not None:
        return _cummax_decay(x, state, dim, decay)
    if x.shape[dim] == 1:
        return x if state is None else max_with_state(x, state.unsqueeze(dim))
    out = cummax_values(x, dim)
    if state is not None:
        out = max_with_state(out, state.unsqueeze(dim))
    return out


def max_with_state(x: Tensor, state: Tensor) -> Tensor:
    """max(x, state), a tie going to x."""
    # torch.maximum splits the gradient of a tie in halves; `where` with `>=` gives it
    # all to the chunk, which is the more recent side.
    return torch.where(x >= state, x, state)


def _cummax_decay(x: Tensor, state: Tensor | None, dim: int, decay: Tensor) -> Tensor:
    """Eager (autograd through torch.cummax) forgetting max, in DECAY_CHUNK pieces; one
    piece under tracing (the graph's prefill length bounds the shift there)."""
    t = x.shape[dim]
    want = x.shape[:dim] + x.shape[dim + 1 :]
    d = decay.expand(want).unsqueeze(dim)
    pieces = [(0, t)] if is_tracing() else decay_pieces(t)
    outs = []
    s = state
    for a, b in pieces:
        xp = x.narrow(dim, a, b - a)
        shape = [1] * x.dim()
        shape[dim] = b - a
        off = torch.arange(b - a, dtype=x.dtype, device=x.device).view(shape) * d
        su = None if s is None else s - decay.expand(want)
        out = running_max_cummax(xp + off, su, dim) - off
        outs.append(out)
        s = out.select(dim, b - a - 1)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim)
