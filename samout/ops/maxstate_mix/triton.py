"""Triton kernels for the gen4 / openash mixers: running max and polynomial in one pass.

    y, new_state = triton_mix(kind, streams, state, alpha, weight)   # contract of fused_mix

kind is "gen4" or "openash" (gen3 has no Triton kernel; `maxstate_mix` sends it to the
fused PyTorch path). streams [B, T, 4, H, dh] as the mixer's projection lays them out.

Forward: one program per (batch row, block of channels) walks time, keeps the running
max e of stream 2 in registers and writes y = a (b + d + α3 e) + b (c + e + α1) + c e +
α2 d (`reference.gen4_ref`, restated in the kernel) at once, so the streams are read once
and y written once (e only when openash needs it for the head mixing G = W [a; b; c; d; e],
a matrix product left to cuBLAS).
One-token decode is the same kernel with T = 1.

Backward (nothing but the streams and the state is saved, as in the fused path): e is
recomputed by the forward kernel, then one kernel walks time backwards and writes the
gradients of all four streams into one buffer laid out like `streams` (what the
projection's backward reads), routes e's gradient through the running max with the
rule of `samout.ops.running_max.triton`, and leaves per-program partial sums for the
three alphas. openash adds the head mixing's gradients (matrix products) around it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from samout.ops.maxstate_mix.fused import stream_major
from samout.ops.maxstate_mix.reference import TRITON_KINDS, check_state
from samout.ops.running_max.blocked import needs_grad
from samout.ops.running_max.triton import BLOCK, acc_dtype


@triton.jit
def _mix_fwd_kernel(st_ptr, s_ptr, al_ptr, y_ptr, e_ptr, so_ptr, T, N, s_b, s_t,
                    HAS_STATE: tl.constexpr, STORE_Y: tl.constexpr, STORE_E: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    al0 = tl.load(al_ptr).to(ACC)
    al1 = tl.load(al_ptr + 1).to(ACC)
    al2 = tl.load(al_ptr + 2).to(ACC)
    if HAS_STATE:
        e = tl.load(s_ptr + b * N + n, mask=mask, other=float("-inf")).to(ACC)
    else:
        e = tl.full((BLOCK,), float("-inf"), ACC)
    base = st_ptr + b * s_b + n
    for t in range(0, T):
        row = base + t * s_t
        c = tl.load(row + 2 * N, mask=mask, other=0.0).to(ACC)
        e = tl.where(c >= e, c, e)  # >=: a tie takes the newer value
        out = (b * T + t) * N + n
        if STORE_Y:
            a = tl.load(row, mask=mask, other=0.0).to(ACC)
            bb = tl.load(row + N, mask=mask, other=0.0).to(ACC)
            d = tl.load(row + 3 * N, mask=mask, other=0.0).to(ACC)
            y = a * (bb + d + al2 * e) + bb * (c + e + al0) + c * e + al1 * d
            tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STORE_E:
            tl.store(e_ptr + out, e.to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(so_ptr + b * N + n, e.to(so_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix_bwd_kernel(g_ptr, st_ptr, e_ptr, gex_ptr, gso_ptr, al_ptr, gst_ptr, gsi_ptr, part_ptr,
                    T, N, s_b, s_t, HAS_STATE: tl.constexpr, HAS_GEX: tl.constexpr,
                    HAS_GSO: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    al0 = tl.load(al_ptr).to(ACC)
    al1 = tl.load(al_ptr + 1).to(ACC)
    al2 = tl.load(al_ptr + 2).to(ACC)
    # The new state is e's last step: its gradient starts the carry.
    if HAS_GSO:
        carry = tl.load(gso_ptr + b * N + n, mask=mask, other=0.0).to(ACC)
    else:
        carry = tl.zeros((BLOCK,), ACC)
    s0 = tl.zeros((BLOCK,), ACC)
    s1 = tl.zeros((BLOCK,), ACC)
    s2 = tl.zeros((BLOCK,), ACC)
    base = st_ptr + b * s_b + n
    gbase = gst_ptr + b * T * 4 * N + n
    for i in range(0, T):
        t = T - 1 - i
        row = base + t * s_t
        a = tl.load(row, mask=mask, other=0.0).to(ACC)
        bb = tl.load(row + N, mask=mask, other=0.0).to(ACC)
        c = tl.load(row + 2 * N, mask=mask, other=0.0).to(ACC)
        d = tl.load(row + 3 * N, mask=mask, other=0.0).to(ACC)
        out = (b * T + t) * N + n
        e = tl.load(e_ptr + out, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + out, mask=mask, other=0.0).to(ACC)
        ge = g * (al2 * a + bb + c)
        if HAS_GEX:
            ge += tl.load(gex_ptr + out, mask=mask, other=0.0).to(ACC)
        total = ge + carry
        event = c == e
        carry = tl.where(event, 0.0, total)
        grow = gbase + t * 4 * N
        ty = gst_ptr.dtype.element_ty
        tl.store(grow, (g * (bb + d + al2 * e)).to(ty), mask=mask)
        tl.store(grow + N, (g * (a + c + e + al0)).to(ty), mask=mask)
        tl.store(grow + 2 * N, (g * (bb + e) + tl.where(event, total, 0.0)).to(ty), mask=mask)
        tl.store(grow + 3 * N, (g * (a + al1)).to(ty), mask=mask)
        s0 += g * bb
        s1 += g * d
        s2 += g * a * e
    if HAS_STATE:
        tl.store(gsi_ptr + b * N + n, carry.to(gsi_ptr.dtype.element_ty), mask=mask)
    prog = b * tl.num_programs(1) + pid_n
    tl.store(part_ptr + prog * 3, tl.sum(s0, axis=0))
    tl.store(part_ptr + prog * 3 + 1, tl.sum(s1, axis=0))
    tl.store(part_ptr + prog * 3 + 2, tl.sum(s2, axis=0))


def _layout(streams: Tensor) -> Tensor:
    """The kernels need each stream's H*dh channels contiguous; batch and time may be strided."""
    b, t, k, h, dh = streams.shape
    ok = streams.stride(4) == 1 and streams.stride(3) == dh and streams.stride(2) == h * dh
    return streams if ok else streams.contiguous()


def _forward(streams: Tensor, state: Tensor | None, alpha: Tensor, store_y: bool,
             store_e: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(y [B,T,H,dh] or None, e [B,T,H,dh] or None, new state [B,H,dh])."""
    b, t, _, h, dh = streams.shape
    n = h * dh
    kw = dict(dtype=streams.dtype, device=streams.device)
    y = torch.empty((b, t, h, dh), **kw) if store_y else None
    e = torch.empty((b, t, h, dh), **kw) if store_e else None
    new_state = torch.empty((b, h, dh), **kw)
    s = state.contiguous() if state is not None else new_state
    grid = (b, triton.cdiv(n, BLOCK))
    _mix_fwd_kernel[grid](streams, s, alpha.contiguous(), y if store_y else new_state,
                          e if store_e else new_state, new_state, t, n,
                          streams.stride(0), streams.stride(1), HAS_STATE=state is not None,
                          STORE_Y=store_y, STORE_E=store_e, ACC=acc_dtype(streams.dtype), BLOCK=BLOCK)
    return y, e, new_state


def _head_mix_forward(weight: Tensor, streams: Tensor, e: Tensor) -> Tensor:
    """G = W [a; b; c; d; e] over the 5H stream-head axis: [B, T, H, dh]."""
    b, t, _, h, dh = streams.shape
    five = stream_major(streams, e, slice(None)).view(5 * h, -1)
    return torch.mm(weight, five).view(h, b * t, dh).transpose(0, 1).reshape(b, t, h, dh)


def _head_mix_backward(g: Tensor, weight: Tensor, streams: Tensor,
                       e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients through y += G ⊙ e: (to e [B,T,H,dh], to the streams [B,T,4,H,dh], to W)."""
    b, t, k, h, dh = streams.shape
    five = stream_major(streams, e, slice(None)).view(5 * h, -1)
    mixed = torch.mm(weight, five).view(h, b * t, dh).transpose(0, 1).reshape(b, t, h, dh)
    gmix = (g * e).reshape(b * t, h, dh).transpose(0, 1).reshape(h, -1)
    gw = torch.mm(gmix, five.t())
    gfive = torch.mm(weight.t(), gmix).view(5 * h, b * t, dh).transpose(0, 1)  # [BT, 5H, dh]
    ge = (g * mixed).add_(gfive[:, k * h:].reshape(b, t, h, dh))
    return ge, gfive[:, : k * h].reshape(b, t, k, h, dh), gw


def _check(kind: str, streams: Tensor, state: Tensor | None) -> None:
    if kind not in TRITON_KINDS:
        raise ValueError(f"no Triton kernel for mixer kind {kind!r}: choose {' or '.join(TRITON_KINDS)}")
    if streams.shape[2] != 4:
        raise ValueError(f"{kind} needs 4 streams, got {streams.shape[2]}")
    check_state(streams, state)


def triton_mix(kind: str, streams: Tensor, state: Tensor | None, alpha: Tensor,
               weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Triton path; same contract as `samout.ops.maxstate_mix.fused.fused_mix`."""
    _check(kind, streams, state)
    if weight is not None and weight.dtype != streams.dtype:
        weight = weight.to(streams.dtype)  # autocast: compute in the streams' dtype, as fused_mix
    if alpha.dtype != streams.dtype:
        alpha = alpha.to(streams.dtype)
    if needs_grad(streams, state, alpha, weight):
        return _TritonMix.apply(kind, streams, state, alpha, weight)
    streams = _layout(streams)
    y, e, new_state = _forward(streams, state, alpha, True, kind == "openash")
    if kind == "openash":
        y.addcmul_(_head_mix_forward(weight, streams, e), e)
    return y, new_state


class _TritonMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, streams, state, alpha, weight):
        streams = _layout(streams)
        y, e, new_state = _forward(streams, state, alpha, True, kind == "openash")
        if kind == "openash":
            y.addcmul_(_head_mix_forward(weight, streams, e), e)
        ctx.kind = kind
        ctx.save_for_backward(streams, state, alpha, weight)  # e is recomputed (one scan)
        return y, new_state

    @staticmethod
    def backward(ctx, gy, gstate):
        streams, state, alpha, weight = ctx.saved_tensors
        b, t, k, h, dh = streams.shape
        n = h * dh
        _, e, _ = _forward(streams, state, alpha, False, True)
        gy = gy.contiguous()
        gex = gs_extra = gw = None
        if ctx.kind == "openash":
            gex, gs_extra, gw = _head_mix_backward(gy, weight, streams, e)
        gs = torch.empty((b, t, k, h, dh), dtype=streams.dtype, device=streams.device)
        gstate_in = torch.empty((b, h, dh), dtype=streams.dtype, device=streams.device)
        nblocks = triton.cdiv(n, BLOCK)
        parts = torch.empty((b * nblocks, 3), dtype=torch.float64 if streams.dtype == torch.float64
                            else torch.float32, device=streams.device)
        gso = gstate.contiguous() if gstate is not None else None
        _mix_bwd_kernel[(b, nblocks)](
            gy, streams, e, gex if gex is not None else gy, gso if gso is not None else gy, alpha,
            gs, gstate_in, parts, t, n, streams.stride(0), streams.stride(1),
            HAS_STATE=state is not None, HAS_GEX=gex is not None, HAS_GSO=gso is not None,
            ACC=acc_dtype(streams.dtype), BLOCK=BLOCK)
        if gs_extra is not None:
            gs.add_(gs_extra)
        galpha = parts.sum(0).to(alpha.dtype)
        return (
            None,
            gs,
            gstate_in if state is not None and ctx.needs_input_grad[2] else None,
            galpha if ctx.needs_input_grad[3] else None,
            gw if ctx.needs_input_grad[4] else None,
        )


__all__ = ["triton_mix"]
