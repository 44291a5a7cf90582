"""The seeds' gated FFN, ffn2(ffn1(x) ⊙ ReLU(gate(x))), as one autograd function that keeps
less for backward (used with `config.recompute`, see samout/ops/recompute.py).

Eager autograd keeps x, ffn1(x), ReLU(gate(x)) and their product (the input of ffn2):
four tensors of the FFN's width per position. This keeps x and the two pre-activations
[ffn1(x); gate(x)] and recomputes the product in backward (one elementwise op). ffn1
and gate also run as one matrix product with their weights side by side (one GEMM of
twice the width instead of two, forward and backward).

    y = gated_ffn(x, w1, b1, wg, bg, w2, b2)   # == ffn2(ffn1(x) * relu(gate(x)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samout.ops.tracing import is_tracing


def gated_ffn_ref(x: Tensor, w1: Tensor, b1: Tensor, wg: Tensor, bg: Tensor, w2: Tensor,
                  b2: Tensor) -> Tensor:
    return F.linear(F.linear(x, w1, b1) * torch.relu(F.linear(x, wg, bg)), w2, b2)


class _GatedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, wg, bg, w2, b2):
        x2 = x.reshape(-1, x.shape[-1])
        ag = torch.addmm(torch.cat([b1, bg]), x2, torch.cat([w1, wg]).t())  # [N, 2F]
        a, g = ag.chunk(2, dim=1)
        p = a * torch.relu(g)
        y = torch.addmm(b2, p, w2.t())
        ctx.save_for_backward(x2, ag, w1, wg, w2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, ag, w1, wg, w2 = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        a, g = ag.chunk(2, dim=1)
        rg = torch.relu(g)
        p = a * rg  # recomputed instead of kept
        gw2 = gy2.t().mm(p)
        gb2 = gy2.sum(0)
        gp = gy2.mm(w2)
        gag = torch.empty_like(ag)
        ga, gg = gag.chunk(2, dim=1)
        torch.mul(gp, rg, out=ga)
        torch.mul(gp, a, out=gg)
        gg.mul_(g > 0)
        gx = gag.mm(torch.cat([w1, wg])).view(ctx.x_shape)
        gw = gag.t().mm(x2)
        gb = gag.sum(0)
        f = w1.shape[0]
        return gx, gw[:f], gb[:f], gw[f:], gb[f:], gw2, gb2


def gated_ffn(x: Tensor, w1: Tensor, b1: Tensor, wg: Tensor, bg: Tensor, w2: Tensor,
              b2: Tensor) -> Tensor:
    if torch.is_autocast_enabled(x.device.type) or is_tracing():
        return gated_ffn_ref(x, w1, b1, wg, bg, w2, b2)  # autocast casts per op; keep its rules
    return _GatedFFN.apply(x, w1, b1, wg, bg, w2, b2)
