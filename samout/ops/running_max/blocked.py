"""The blocked scan: the running max (see `reference`) as elementwise ops, any device.

    m = blocked_running_max(x, state, dim, decay)     # the "fused" kernel of `running_max`

A blocked scan made of elementwise ops (so it runs on every core, whatever the memory
layout) inside an autograd function whose backward recovers the gradient routing from
the saved input and output: no int64 arg-max indices are kept for backward. (Small
inputs use one `torch.cummax`, whose indices the backward recomputes as a temporary.)
Under tracing it hands over to `running_max_cummax`, which has no Python loop.

How the backward works without indices: call position t an *event* when x_t == m_t
(x_t is, or ties with, the running max, and by the tie rule of `reference` it wins). The
gradient of output t goes to the latest event <= t, or to the state when there is none.
So the input gradient is a segmented suffix sum of the output gradient, each segment
starting at an event; it is computed with float ops only (the segment masks are 0/1, so
the sums are exact additions of the same terms, not differences of prefix sums).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from samout.ops.running_max.reference import decay_pieces, max_with_state, running_max_cummax
from samout.ops.tracing import is_tracing


def blocked_running_max(x: Tensor, state: Tensor | None = None, dim: int = 1,
                        decay: Tensor | None = None) -> Tensor:
    """Inclusive running maximum of `x` along `dim`, continuing from `state`.

    x:     [..., T, ...] with time on `dim`.
    state: x's shape without `dim` (the running max before this call), or None.
    decay: None, or δ >= 0 broadcastable to the state's shape (a forgetting max).
    Returns a tensor shaped like x; its last slice along `dim` is the new state.
    """
    if is_tracing():
        return running_max_cummax(x, state, dim, decay)
    dim = dim % x.dim()
    x3, s2 = to_ptq(x, state, dim)
    if decay is not None:
        d1 = _decay_q(decay, x, dim)
        if needs_grad(x, state, decay):
            return _RunningMaxDecay.apply(x3, s2, d1).view(x.shape)
        return scan_max_decay(x3, s2, d1).view(x.shape)
    if needs_grad(x, state):
        m3 = _RunningMax.apply(x3, s2)
    else:
        m3 = scan_max(x3, s2)
    return m3.view(x.shape)


# -- the blocked scan -----------------------------------------------------------------
# Time is cut into blocks of L = sqrt(T) steps. Step i of every block is one elementwise
# op over [P, blocks, Q], so each op is large enough to use all cores and the Python
# loop is only ~2 sqrt(T) ops long; a short pass then carries each block's maximum into
# the next. Every op is an exact max (forward) or an exact 0/1-masked add (backward).


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def to_ptq(x: Tensor, state: Tensor | None, dim: int) -> tuple[Tensor, Tensor | None]:
    """View x as [P, T, Q] (a copy only if its strides do not allow a view)."""
    p = math.prod(x.shape[:dim])
    q = math.prod(x.shape[dim + 1 :])
    x3 = x.reshape(p, x.shape[dim], q)
    if state is None:
        return x3, None
    want = x.shape[:dim] + x.shape[dim + 1 :]
    if state.shape != want:
        raise ValueError(f"running max state must have shape {tuple(want)}, got {tuple(state.shape)}")
    return x3, state.reshape(p, q)


def _block(t: int) -> int:
    return max(2, math.isqrt(t))


# Below this many elements the blocked scan's ~2 sqrt(T) small ops cost more than one
# `torch.cummax` (whose indices are then only a temporary of the backward, never saved).
SMALL_SCAN = 1 << 15


def _small(x: Tensor) -> bool:
    return x.numel() <= SMALL_SCAN


def scan_max(x: Tensor, state: Tensor | None = None) -> Tensor:
    """Running max of x [P, T, Q] (any strides) along dim 1 from state [P, Q] or None.
    Returns a new contiguous [P, T, Q] tensor."""
    p, t, q = x.shape
    if _small(x) and t > 1:
        return running_max_cummax(x, state, dim=1).contiguous()
    m = torch.empty((p, t, q), dtype=x.dtype, device=x.device)
    if t == 1:
        m[:, 0] = x[:, 0] if state is None else max_with_state(x[:, 0], state)
        return m
    size = _block(t)
    nb = t // size
    main = nb * size
    xb = x[:, :main].unflatten(1, (nb, size))
    mb = m[:, :main].unflatten(1, (nb, size))
    mb[:, :, 0] = xb[:, :, 0]
    for i in range(1, size):
        torch.maximum(xb[:, :, i], mb[:, :, i - 1], out=mb[:, :, i])
    # Carry: block j also sees the maxima of blocks < j and the state.
    carry = torch.cummax(mb[:, :, -1], dim=1).values  # [P, nb, Q], small
    if state is not None:
        torch.maximum(carry, state.unsqueeze(1), out=carry)
        torch.maximum(mb[:, 0], state.unsqueeze(1), out=mb[:, 0])
    if nb > 1:
        torch.maximum(mb[:, 1:], carry[:, :-1].unsqueeze(2), out=mb[:, 1:])
    for i in range(main, t):  # the last, partial block
        torch.maximum(x[:, i], m[:, i - 1], out=m[:, i])
    return m


def scan_max_backward(
    grad: Tensor, x: Tensor, m: Tensor, state: Tensor | None, *, inplace: bool = False,
    work: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of `scan_max` for x [P, T, Q] and state, from grad [P, T, Q], the
    input x and the output m. Returns (grad_x contiguous, grad_state).

    inplace: grad is a contiguous scratch tensor that may be overwritten (and returned
    as grad_x); work: an optional [P, T, Q] scratch tensor. Both save large allocations.
    """
    p, t, q = x.shape
    if _small(x):
        # Same routing from cummax's indices (latest position of a tie), recomputed here.
        values, index = torch.cummax(x, dim=1)
        g = grad
        grad_state = None
        if state is not None:
            from_state = values < state.unsqueeze(1)  # the state wins only when strictly larger
            grad_state = torch.where(from_state, grad, 0).sum(1)
            g = torch.where(from_state, 0, grad)
        gx = torch.zeros((p, t, q), dtype=grad.dtype, device=grad.device)
        return gx.scatter_add_(1, index, g), grad_state
    # ne_t = 1 where x_t is not the running max: output t's gradient flows on to t - 1.
    ne = work if work is not None else torch.empty((p, t, q), dtype=grad.dtype, device=grad.device)
    torch.ne(x, m, out=ne)
    acc = grad if inplace else grad.clone(memory_format=torch.contiguous_format)
    # acc_t = grad_t + ne_{t+1} * acc_{t+1}: the sum of the gradients that end at t's
    # segment start, computed from the end of time backwards.
    size = _block(t)
    nb = t // size
    main = nb * size
    for i in range(t - 2, main - 1, -1):  # the partial block at the end, sequentially
        torch.addcmul(acc[:, i], ne[:, i + 1], acc[:, i + 1], out=acc[:, i])
    if nb:
        ab = acc[:, :main].unflatten(1, (nb, size))
        nb_ = ne[:, :main].unflatten(1, (nb, size))
        # Local pass: each block on its own (nothing flows in from the next block).
        for i in range(size - 2, -1, -1):
            torch.addcmul(ab[:, :, i], nb_[:, :, i + 1], ab[:, :, i + 1], out=ab[:, :, i])
        # Carries between blocks, from the last block backwards: what flows into block j
        # from its successor (and, for the last block, from the partial block). It reaches
        # a block's start only if no position after the start is an event.
        open_start = nb_[:, :, 1:].amin(dim=2)  # [P, nb, Q]
        carry = torch.zeros((p, nb, q), dtype=grad.dtype, device=grad.device)
        if main < t:
            torch.mul(ne[:, main], acc[:, main], out=carry[:, nb - 1])
        for j in range(nb - 1, 0, -1):
            start = torch.addcmul(ab[:, j, 0], open_start[:, j], carry[:, j])
            torch.mul(nb_[:, j, 0], start, out=carry[:, j - 1])
        # Second pass: add each block's carry until it meets an event, going backwards.
        for i in range(size - 1, -1, -1):
            torch.add(ab[:, :, i], carry, out=ab[:, :, i])
            if i:
                carry.mul_(nb_[:, :, i])
    grad_state = None
    if state is not None:
        grad_state = ne[:, 0] * acc[:, 0]  # gradients that end before the first event
    # Only events keep their segment's sum (acc - acc * ne is exact: ne is 0 or 1).
    return acc.addcmul_(acc, ne, value=-1), grad_state


def scan_function(forward, backward) -> type[torch.autograd.Function]:
    """An autograd Function for a running-max scan m = forward(x, state) whose gradients
    backward(grad, x, m, state) -> (grad x, grad state) recovers from the input and output
    alone: no arg-max indices are kept (shared by the blocked scan and the Triton kernels)."""

    class Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, state: Tensor | None) -> Tensor:
            m = forward(x, state)
            ctx.save_for_backward(x, m, state)
            return m

        @staticmethod
        def backward(ctx, grad: Tensor):
            return backward(grad, *ctx.saved_tensors)

    return Scan


_RunningMax = scan_function(scan_max, scan_max_backward)


# -- the forgetting running max (decay) -------------------------------------------------
# The blocked scan of the shifted sequence, piece by piece (`reference.decay_pieces`).


def _decay_q(decay: Tensor, x: Tensor, dim: int) -> Tensor:
    """δ as [P, Q], matching the [P, T, Q] view of x (a broadcast δ is expanded; autograd
    sums its gradient back)."""
    want = x.shape[:dim] + x.shape[dim + 1 :]
    return decay.expand(want).reshape(math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :]))


def _offsets(n: int, like: Tensor) -> Tensor:
    return torch.arange(n, dtype=like.dtype, device=like.device).view(1, n, 1)


def scan_max_decay(x: Tensor, state: Tensor | None, decay: Tensor) -> Tensor:
    """Forgetting running max of x [P, T, Q] from state [P, Q] or None, with decay
    [P, Q] (>= 0): m_t = max(x_t, m_{t-1} - δ). Returns a new [P, T, Q] tensor."""
    p, t, q = x.shape
    m = torch.empty((p, t, q), dtype=x.dtype, device=x.device)
    d = decay.unsqueeze(1)
    s = state
    for a, b in decay_pieces(t):
        off = _offsets(b - a, x) * d  # [P, n, Q]
        u = x[:, a:b] + off
        su = None if s is None else s - decay
        mm = scan_max(u, su)
        torch.sub(mm, off, out=m[:, a:b])
        s = m[:, b - 1]
    return m


def scan_max_decay_backward(
    grad: Tensor, x: Tensor, m: Tensor, state: Tensor | None, decay: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients of `scan_max_decay` for x, state and decay ([P, Q], summed over nothing:
    the caller reduces over broadcast rows). Pieces are replayed from the last: each
    piece's incoming state is the previous piece's last output, so its gradient is
    added to that output's gradient before the previous piece is processed."""
    p, t, q = x.shape
    d = decay.unsqueeze(1)
    gx = torch.empty_like(x)
    gdecay = torch.zeros((p, q), dtype=x.dtype, device=x.device)
    g = grad.clone(memory_format=torch.contiguous_format)
    gstate = None
    for a, b in reversed(decay_pieces(t)):
        n = b - a
        pos = _offsets(n, x)
        off = pos * d
        u = x[:, a:b] + off
        s = state if a == 0 else m[:, a - 1]
        su = None if s is None else s - decay
        mm = scan_max(u, su)  # recomputed bit for bit: the events are exact
        gp = g[:, a:b]
        gu, gsu = scan_max_backward(gp, u, mm, su)
        gx[:, a:b] = gu
        # u_s = x_s + s δ, m_t = M_t - t δ, su = S - δ.
        gdecay += (gu * pos).sum(1) - (gp * pos).sum(1)
        if gsu is not None:
            gdecay -= gsu
            if a == 0:
                gstate = gsu
            else:
                g[:, a - 1] += gsu
    return gx, gstate, gdecay


class _RunningMaxDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, state: Tensor | None, decay: Tensor) -> Tensor:
        m = scan_max_decay(x, state, decay)
        ctx.save_for_backward(x, m, state, decay)
        return m

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, m, state, decay = ctx.saved_tensors
        gx, gs, gd = scan_max_decay_backward(grad, x, m, state, decay)
        return gx, gs, gd
