"""Fused MaxStateSuper mixing: running max + polynomial in one autograd function.

    y, new_state = fused_mix(kind, streams, state, alpha, weight, decay)   # the "fused" kernel

Same contract as `reference.mix_ref`. What the fused form changes, and why it is faster
and leaner than eager autograd:
- backward keeps only the streams (which the projection produced anyway) and the state,
  and recomputes the running max e (one cheap scan); eager autograd also keeps every
  intermediate of the polynomial, the int64 arg-max indices of `torch.cummax`, and
  zero-fills a full streams-sized buffer for each stream it unbinds;
- the gradients of all streams are written into one buffer laid out like `streams`, so
  the projection's backward reads it as is (no stack or cat);
- the running max is the blocked scan of `samout.ops.running_max.blocked`; its backward
  routes gradients from the saved input and output (no indices).

With `decay` δ [H, dh] (`max_decay`), the running max forgets: e_t = max(c_t, e_{t-1} - δ),
computed and differentiated (δ included) by `samout.ops.running_max.blocked.scan_max_decay`.
decay=None runs exactly the code that existed before the option.

The polynomial is restated here with plain binary ops (no fused multiply-add), so every
position is computed by the same IEEE operations whatever the chunk length: full,
chunked and one-step calls stay bit-identical. Against the reference it agrees to
float rounding (the terms are grouped differently); the running max is bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samout.ops.maxstate_mix.reference import MAX_STREAM, check_kind, check_state, mix_ref
from samout.ops.running_max.blocked import (
    needs_grad,
    scan_max,
    scan_max_backward,
    scan_max_decay,
    scan_max_decay_backward,
)
from samout.ops.tracing import is_tracing

# -- the fused kernels ----------------------------------------------------------------
# forward(alpha, weight, streams, e) -> y
# backward(g, alpha, weight, streams, e, gs) -> (ge, galpha, gweight); writes the direct
# gradients of every stream into gs (laid out like streams); ge is the gradient of e.


def gen4_forward(al: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor) -> Tensor:
    """`reference.gen4_ref` in place, with plain binary ops (see the module doc):
    y = a (b + d + α3 e) + b (c + e + α1) + c e + α2 d."""
    t = torch.mul(e, al[2])
    t.add_(b).add_(d)
    y = torch.mul(a, t)
    torch.add(c, e, out=t)
    t.add_(al[0]).mul_(b)
    y.add_(t)
    torch.mul(c, e, out=t)
    y.add_(t)
    torch.mul(d, al[1], out=t)
    return y.add_(t)


def gen4_backward(g, al, a, b, c, d, e, ga, gb, gc, gd) -> tuple[Tensor, Tensor]:
    t = torch.addcmul(b, e, al[2])
    t.add_(d)
    torch.mul(g, t, out=ga)  # b + d + α3 e
    torch.add(a, c, out=t)
    t.add_(e).add_(al[0])
    torch.mul(g, t, out=gb)  # a + c + e + α1
    torch.add(b, e, out=t)
    torch.mul(g, t, out=gc)  # b + e (the direct part; the running max adds its own)
    torch.add(a, al[1], out=t)
    torch.mul(g, t, out=gd)  # a + α2
    ge = torch.mul(a, al[2])
    ge.add_(b).add_(c).mul_(g)  # α3 a + b + c
    torch.mul(g, b, out=t)
    g1 = t.sum()
    torch.mul(g, d, out=t)
    g2 = t.sum()
    torch.mul(a, e, out=t)
    g3 = t.mul_(g).sum()
    return ge, torch.stack([g1, g2, g3])


class _Gen3:
    @staticmethod
    def forward(al, weight, streams, e):
        a, b, c = streams.unbind(2)
        # y = e (a + b + c + α2 + α5) + α1 b + α3 a + α4 c
        t = torch.add(a, b)
        t.add_(c).add_(al[1] + al[4])
        y = torch.mul(e, t)
        for coef, s in ((al[0], b), (al[2], a), (al[3], c)):
            torch.mul(s, coef, out=t)
            y.add_(t)
        return y

    @staticmethod
    def backward(g, al, weight, streams, e, gs):
        a, b, c = streams.unbind(2)
        for coef, out in ((al[2], gs[:, :, 0]), (al[0], gs[:, :, 1]), (al[3], gs[:, :, 2])):
            torch.mul(torch.add(e, coef, out=out), g, out=out)
        ge = torch.add(a, b)
        ge.add_(c).add_(al[1] + al[4]).mul_(g)
        t = torch.empty_like(ge)
        sums = []
        for s in (b, e, a, c):
            torch.mul(g, s, out=t)
            sums.append(t.sum())
        return ge, torch.stack([sums[0], sums[1], sums[2], sums[3], sums[1]]), None


class _Gen4:
    @staticmethod
    def forward(al, weight, streams, e):
        return gen4_forward(al, *streams.unbind(2), e)

    @staticmethod
    def backward(g, al, weight, streams, e, gs):
        ge, galpha = gen4_backward(g, al, *streams.unbind(2), e, *gs.unbind(2))
        return ge, galpha, None


def stream_major(streams: Tensor, e: Tensor, rows: slice) -> Tensor:
    """[5H, n, dh] copy of the five streams [a; b; c; d; e] of positions `rows` (of the
    flattened B*T), stream-head axis first: G = W @ this is one large matrix product
    (a batch of B*T tiny [H, 5H] @ [5H, dh] products is several times slower)."""
    b, t, k, h, dh = streams.shape
    s3 = streams.reshape(b * t, k * h, dh)[rows]
    e3 = e.reshape(b * t, h, dh)[rows]
    five = torch.empty((5 * h, s3.shape[0], dh), dtype=streams.dtype, device=streams.device)
    five[: k * h].copy_(s3.transpose(0, 1))
    five[k * h :].copy_(e3.transpose(0, 1))
    return five


HEAD_MIX_CHUNK = 1 << 16  # positions x channels per [5H, rows, dh] copy (a few MiB)


def _row_chunks(n: int, dh: int) -> list[slice]:
    step = max(1, HEAD_MIX_CHUNK // dh)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _head_mix(weight: Tensor, streams: Tensor, e: Tensor) -> Tensor:
    """G = W [a; b; c; d; e] over the 5H stream-head axis, per position and channel.
    Returns [B, T, H, dh] (a strided view of an [H, B*T, dh] tensor)."""
    b, t, _, h, dh = streams.shape
    g = torch.empty((h, b * t, dh), dtype=streams.dtype, device=streams.device)
    for rows in _row_chunks(b * t, dh):
        five = stream_major(streams, e, rows)
        g[:, rows] = torch.mm(weight, five.view(5 * h, -1)).view(h, -1, dh)
    return g.transpose(0, 1).unflatten(0, (b, t))


class _OpenAsh:
    @staticmethod
    def forward(al, weight, streams, e):
        y = gen4_forward(al, *streams.unbind(2), e)
        g = _head_mix(weight, streams, e)
        return y.add_(g.mul_(e))

    @staticmethod
    def backward(g, al, weight, streams, e, gs):
        ge, galpha = gen4_backward(g, al, *streams.unbind(2), e, *gs.unbind(2))
        b, t, k, h, dh = streams.shape
        kh = k * h
        gw = torch.zeros_like(weight)
        g3, e3, ge3 = g.reshape(b * t, h, dh), e.reshape(b * t, h, dh), ge.view(b * t, h, dh)
        gs3 = gs.view(b * t, kh, dh)
        for rows in _row_chunks(b * t, dh):
            five = stream_major(streams, e, rows).view(5 * h, -1)
            # y += G ⊙ e: e gets G (recomputed) and G gets g ⊙ e.
            mixed = torch.mm(weight, five).view(h, -1, dh)
            ge3[rows].addcmul_(g3[rows], mixed.transpose(0, 1))
            gmix = torch.empty((h, mixed.shape[1], dh), dtype=g.dtype, device=g.device)
            torch.mul(g3[rows].transpose(0, 1), e3[rows].transpose(0, 1), out=gmix)
            gmix = gmix.view(h, -1)
            gw.addmm_(gmix, five.t())
            gfive = torch.mm(weight.t(), gmix).view(5 * h, -1, dh)
            gs3[rows].add_(gfive[:kh].transpose(0, 1))
            ge3[rows].add_(gfive[kh:].transpose(0, 1))
        return ge, galpha, gw


# The polynomial of each kind, as forward/backward functions (not the `kernel` setting).
POLYNOMIALS = {"gen3": _Gen3, "gen4": _Gen4, "openash": _OpenAsh}


def _decay_rows(decay: Tensor, b: int) -> Tensor:
    return decay.reshape(1, -1).expand(b, -1)


def scan_streams(streams: Tensor, state: Tensor | None, decay: Tensor | None = None) -> Tensor:
    """The running max e [B, T, H, dh] of the max stream, by the blocked scan."""
    b, t, _, h, dh = streams.shape
    s2 = None if state is None else state.reshape(b, h * dh)
    c = streams[:, :, MAX_STREAM].reshape(b, t, h * dh)
    if decay is not None:
        return scan_max_decay(c, s2, _decay_rows(decay, b)).view(b, t, h, dh)
    return scan_max(c, s2).view(b, t, h, dh)


def fused_mix(
    kind: str, streams: Tensor, state: Tensor | None, alpha: Tensor, weight: Tensor | None = None,
    decay: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The fast path; same contract as `mix_ref`."""
    check_kind(kind)
    if is_tracing():
        return mix_ref(kind, streams, state, alpha, weight, decay)
    check_state(streams, state)
    if weight is not None and weight.dtype != streams.dtype:
        # Under autocast the streams come out of the projection in bf16/fp16 while the
        # head-mixing weight is fp32: compute in the streams' dtype, as nn.Linear would
        # under autocast (the cast is differentiable, so the fp32 weight gets its gradient).
        weight = weight.to(streams.dtype)
    if decay is not None and decay.dtype != streams.dtype:
        decay = decay.to(streams.dtype)  # autocast, as for the weight
    if needs_grad(streams, state, alpha, weight, decay):
        return _FusedMix.apply(kind, streams, state, alpha, weight, decay)
    e = scan_streams(streams, state, decay)
    return POLYNOMIALS[kind].forward(alpha, weight, streams, e), e[:, -1]


class _FusedMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, streams, state, alpha, weight, decay):
        e = scan_streams(streams, state, decay)
        y = POLYNOMIALS[kind].forward(alpha, weight, streams, e)
        ctx.kind = kind
        # e is not saved: recomputing it in backward costs one cheap scan and saves a
        # [B, T, D] tensor per layer.
        ctx.save_for_backward(streams, state, alpha, weight, decay)
        return y, e[:, -1].clone()

    @staticmethod
    def backward(ctx, gy, gstate):
        streams, state, alpha, weight, decay = ctx.saved_tensors
        gs, gstate_in, galpha, gweight, gdecay = mix_backward(ctx.kind, streams, state, alpha, weight,
                                                              decay, gy, gstate)
        return (
            None,
            gs,
            gstate_in if ctx.needs_input_grad[2] else None,
            galpha if ctx.needs_input_grad[3] else None,
            gweight if ctx.needs_input_grad[4] else None,
            gdecay if ctx.needs_input_grad[5] else None,
        )


def mix_backward(kind: str, streams: Tensor, state: Tensor | None, alpha: Tensor, weight: Tensor | None,
                 decay: Tensor | None, gy: Tensor, gstate: Tensor):
    """The gradients of `fused_mix` from its inputs (the running max recomputed):
    (streams [B, T, k, H, dh], state or None, alpha, weight or None, decay or None)."""
    e = scan_streams(streams, state, decay)
    b, t, k, h, dh = streams.shape
    gs = torch.empty((b, t, k, h, dh), dtype=streams.dtype, device=streams.device)
    ge, galpha, gweight = POLYNOMIALS[kind].backward(gy, alpha, weight, streams, e, gs)
    ge[:, -1].add_(gstate)  # the new state is e's last step
    c = streams[:, :, MAX_STREAM].reshape(b, t, h * dh)
    s2 = None if state is None else state.reshape(b, h * dh)
    gdecay = None
    if decay is None:
        gc, gstate_in = scan_max_backward(
            ge.view(b, t, h * dh), c, e.view(b, t, h * dh), s2, inplace=True
        )
    else:
        gc, gstate_in, gdecay = scan_max_decay_backward(
            ge.view(b, t, h * dh), c, e.view(b, t, h * dh), s2, _decay_rows(decay, b)
        )
        gdecay = gdecay.sum(0).view(decay.shape)
    gs[:, :, MAX_STREAM].add_(gc.view(b, t, h, dh))
    if gstate_in is not None:
        gstate_in = gstate_in.view(b, h, dh)
    return gs, gstate_in, galpha, gweight, gdecay
