"""Leaner training memory: the mixer's projection recomputed in backward.

The largest tensors a SamOut layer keeps for backward are the k projected streams
[B, T, k, H, dh] (k = 4 for gen4/openash: four times the layer's width per position),
which the mixing kernels need to compute their gradients. With `config.recompute` the
mixer keeps only its input x (which the layer keeps anyway) and the incoming state, and
computes the streams again in backward: one more projection matrix product per layer and
step, for 4D fewer floats per position and layer.

Two forms, the same function (tests compare gradients with the plain path):
- `_ProjectMix` (fused mixers on the "fused" kernel, no autocast): one autograd function
  for projection + mixing whose backward recomputes only the projection and goes
  straight to the fused mix's backward (`maxstate_mix.fused.mix_backward`, which recomputes the
  running max as it always does). Nothing else runs twice.
- `torch.utils.checkpoint` (non-reentrant) around `project` + `mix` for everything else
  (Triton, reference, the conv and dual mixers, autocast): it runs the whole mixing
  forward again in backward, about 4% more step time at 1024 tokens than the above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from samout.ops.kernels import resolve_kernel
from samout.ops.maxstate_mix.fused import POLYNOMIALS, mix_backward, scan_streams
from samout.ops.maxstate_mix.reference import check_state
from samout.ops.tracing import is_tracing


def project_and_mix_recomputed(mixer, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """mixer.mix(mixer.project(x), state), keeping only x and state for backward."""
    if (mixer.fused is not None and resolve_kernel(mixer.kernel, x) == "fused" and not is_tracing()
            and not torch.is_autocast_enabled(x.device.type)):
        return _ProjectMix.apply(mixer.fused, x, mixer.proj.weight, mixer.proj.bias, state, mixer.alpha,
                                 mixer.fused_weight(), mixer.decay(), mixer.num_heads, mixer.head_dim)
    return checkpoint(_project_and_mix, mixer, x, state, use_reentrant=False, preserve_rng_state=False)


def _project_and_mix(mixer, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    return mixer.mix(mixer.project(x), state)


def _project(x: Tensor, w: Tensor, bias: Tensor | None, heads: int, dh: int) -> Tensor:
    b, t, _ = x.shape
    return F.linear(x, w, bias).view(b, t, -1, heads, dh)


class _ProjectMix(torch.autograd.Function):
    """(y, new state) = fused_mix(kind, project(x), state, ...), saving x, not the streams."""

    @staticmethod
    def forward(ctx, kind, x, w, bias, state, alpha, weight, decay, heads, dh):
        streams = _project(x, w, bias, heads, dh)
        check_state(streams, state)
        e = scan_streams(streams, state, decay)
        y = POLYNOMIALS[kind].forward(alpha, weight, streams, e)
        ctx.kind, ctx.heads, ctx.dh = kind, heads, dh
        ctx.save_for_backward(x, w, bias, state, alpha, weight, decay)
        return y, e[:, -1].clone()

    @staticmethod
    def backward(ctx, gy, gstate):
        x, w, bias, state, alpha, weight, decay = ctx.saved_tensors
        streams = _project(x, w, bias, ctx.heads, ctx.dh)
        gs, gstate_in, galpha, gweight, gdecay = mix_backward(ctx.kind, streams, state, alpha, weight,
                                                              decay, gy, gstate)
        need = ctx.needs_input_grad
        g2 = gs.view(-1, w.shape[0])
        gx = (g2 @ w).view_as(x) if need[1] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if need[2] else None
        gb = g2.sum(0) if bias is not None and need[3] else None
        return (None, gx, gw, gb, gstate_in if need[4] else None, galpha if need[5] else None,
                gweight if need[6] else None, gdecay if need[7] else None, None, None)
