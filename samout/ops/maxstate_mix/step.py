"""gen4 and openash for one token per row (decoding, no autograd), in few operations.

    y, new_state = mix_step(streams, state, alpha, weight, decay)   # streams [N, 4, H, dh]

Decoding a small batch costs per operation, not per number, so the polynomial of
`reference.gen4_ref` is restated here with fused multiply-adds (the fewest operations);
it equals `fused_mix` on one step to float rounding (tests/ops/test_maxstate_mix.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def step_max(c: Tensor, state: Tensor | None, decay: Tensor | None) -> Tensor:
    """One step of the running max: max(c, state - δ), or c (a copy) with no state."""
    if state is None:
        return c.clone()
    return torch.maximum(c, state if decay is None else state - decay)


def mix_step(streams: Tensor, state: Tensor | None, alpha: Tensor, weight: Tensor | None = None,
             decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y = a (b + d + α3 e) + b (c + e + α1) + c e + α2 d [+ G ⊙ e with `weight`, openash]
    for streams [N, 4, H, dh]; returns (y [N, H, dh], the new state e [N, H, dh])."""
    n, _, h, _ = streams.shape
    a, b, c, d = streams.unbind(1)
    e = step_max(c, state, decay)
    al = alpha
    y = a * torch.addcmul(b + d, e, al[2])
    y.addcmul_(b, (c + e).add_(al[0])).addcmul_(c, e).addcmul_(d, al[1])
    if weight is not None:
        # G = W [a; b; c; d; e] over the 5H stream-head axis, channels along for the ride.
        five = torch.cat([streams.view(n, 4 * h, -1), e], dim=1)
        y.addcmul_(torch.matmul(weight, five), e)
    return y, e
