"""Triton kernels for the running max over time (the "triton" kernel of `running_max`).

    m = triton_running_max(x, state, dim)      # same contract as samout.ops.running_max

One program owns a block of channels of one row and walks time sequentially, keeping
the running max in registers: the input is read once and the output written once (the
scan is memory-bound, so that is the whole cost). The backward walks time backwards
with the same routing rule as the blocked scan, from the saved input and output (no
arg-max indices):

    position t is an *event* when x_t == m_t (ties go to the newest position; the
    incoming state counts as older than every position of the chunk);
    the gradient of output t goes to the latest event <= t, or to the state.

so `carry` (gradient still looking for its event) is added to each position's own
gradient and handed to the position if it is an event, else passed on to t - 1.

Triton is imported here only: `samout.ops.running_max` imports this module lazily, so CPU
users never need triton, and tests can set TRITON_INTERPRET=1 before the first import
(the interpreter runs these kernels on CPU tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from samout.ops.running_max.blocked import needs_grad, scan_function, to_ptq

BLOCK = 128  # channels per program (one warp-friendly vector)


def acc_dtype(dtype: torch.dtype):
    """The dtype the kernels compute in: float64 stays float64 (tests), the rest float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _scan_fwd_kernel(x_ptr, s_ptr, m_ptr, T, Q, sx_p, sx_t,
                     HAS_STATE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = q < Q
    if HAS_STATE:
        acc = tl.load(s_ptr + p * Q + q, mask=mask, other=float("-inf")).to(ACC)
    else:
        acc = tl.full((BLOCK,), float("-inf"), ACC)
    for t in range(0, T):
        x = tl.load(x_ptr + p * sx_p + t * sx_t + q, mask=mask, other=float("-inf")).to(ACC)
        acc = tl.where(x >= acc, x, acc)  # >=: a tie takes the newer value
        tl.store(m_ptr + (p * T + t) * Q + q, acc.to(m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_bwd_kernel(g_ptr, x_ptr, m_ptr, gx_ptr, gs_ptr, T, Q, sx_p, sx_t,
                     HAS_STATE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = q < Q
    carry = tl.zeros((BLOCK,), ACC)
    for i in range(0, T):
        t = T - 1 - i
        row = (p * T + t) * Q + q
        g = tl.load(g_ptr + row, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + p * sx_p + t * sx_t + q, mask=mask, other=0.0).to(ACC)
        m = tl.load(m_ptr + row, mask=mask, other=0.0).to(ACC)
        total = g + carry
        event = x == m
        tl.store(gx_ptr + row, tl.where(event, total, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)
        carry = tl.where(event, 0.0, total)
    if HAS_STATE:
        tl.store(gs_ptr + p * Q + q, carry.to(gs_ptr.dtype.element_ty), mask=mask)


def _rows(x3: Tensor) -> Tensor:
    # The kernels index channels with unit stride; time and rows may be strided.
    return x3 if x3.stride(2) == 1 else x3.contiguous()


def scan_max_triton(x3: Tensor, state: Tensor | None) -> Tensor:
    """Running max of x3 [P, T, Q] along dim 1 from state [P, Q] or None: a new
    contiguous [P, T, Q] tensor."""
    x3 = _rows(x3)
    p, t, q = x3.shape
    m = torch.empty((p, t, q), dtype=x3.dtype, device=x3.device)
    s = state.contiguous() if state is not None else x3  # any pointer when there is no state
    grid = (p, triton.cdiv(q, BLOCK))
    _scan_fwd_kernel[grid](x3, s, m, t, q, x3.stride(0), x3.stride(1), HAS_STATE=state is not None,
                           ACC=acc_dtype(x3.dtype), BLOCK=BLOCK)
    return m


def scan_max_backward_triton(grad: Tensor, x3: Tensor, m: Tensor,
                             state: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(grad_x [P, T, Q] contiguous, grad_state [P, Q] or None) from the output gradient."""
    x3 = _rows(x3)
    p, t, q = x3.shape
    grad = grad.contiguous()
    gx = torch.empty((p, t, q), dtype=grad.dtype, device=grad.device)
    gs = torch.empty((p, q), dtype=grad.dtype, device=grad.device) if state is not None else gx
    grid = (p, triton.cdiv(q, BLOCK))
    _scan_bwd_kernel[grid](grad, x3, m, gx, gs, t, q, x3.stride(0), x3.stride(1),
                           HAS_STATE=state is not None, ACC=acc_dtype(x3.dtype), BLOCK=BLOCK)
    return gx, (gs if state is not None else None)


_TritonRunningMax = scan_function(scan_max_triton, scan_max_backward_triton)


def triton_running_max(x: Tensor, state: Tensor | None = None, dim: int = 1) -> Tensor:
    """Inclusive running max of x along `dim` from `state` (see samout.ops.running_max)."""
    dim = dim % x.dim()
    x3, s2 = to_ptq(x, state, dim)
    if needs_grad(x, state):
        m3 = _TritonRunningMax.apply(x3, s2)
    else:
        m3 = scan_max_triton(x3, s2)
    return m3.view(x.shape)
