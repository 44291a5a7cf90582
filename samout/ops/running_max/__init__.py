"""The running maximum over time with an incoming state: SamOut's whole memory.

    m = running_max(x, state, dim=1, decay=None, kernel="fused")
    m_t = max(S, s_1, ..., s_t)        new state = m_T

One function, several backends with the same semantics (`reference` states them, ties
and the forgetting max included; tests/ops/test_running_max.py compares them):

- `reference`: `running_max_ref` (a float64 loop) and `running_max_cummax` (eager
  `torch.cummax`: the "reference" kernel, and what graphs capture);
- `blocked`: the blocked scan of elementwise ops, any device (the "fused" kernel);
- `triton`: a Triton kernel (the "triton" kernel; no forgetting max yet, so a decay
  takes the blocked scan).
"""

from __future__ import annotations

from torch import Tensor

from samout.ops.kernels import resolve_kernel
from samout.ops.running_max.blocked import blocked_running_max
from samout.ops.running_max.reference import running_max_cummax, running_max_ref


def running_max(x: Tensor, state: Tensor | None = None, dim: int = 1, decay: Tensor | None = None,
                *, kernel: str = "fused") -> Tensor:
    """Inclusive running maximum of `x` along `dim`, continuing from `state`.

    x:      [..., T, ...] with time on `dim`.
    state:  x's shape without `dim` (the running max before this call), or None.
    decay:  None, or δ >= 0 broadcastable to the state's shape (a forgetting max).
    kernel: a `SamOutConfig.kernel` setting ("auto", "fused", "reference", "triton").
    Returns a tensor shaped like x; its last slice along `dim` is the new state.
    """
    kernel = resolve_kernel(kernel, x)
    if kernel == "reference":
        return running_max_cummax(x, state, dim, decay)
    if kernel == "triton" and decay is None:
        # Imported here: triton is optional, and tests set TRITON_INTERPRET before the import.
        from samout.ops.running_max.triton import triton_running_max

        return triton_running_max(x, state, dim)
    return blocked_running_max(x, state, dim, decay)


__all__ = ["running_max", "running_max_cummax", "running_max_ref"]
