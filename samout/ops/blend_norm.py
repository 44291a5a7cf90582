"""The layer's blend and norm, LayerNorm(α h + (1 − α) x), as one autograd function that
keeps less for backward (used with `config.recompute`, see samout/ops/recompute.py).

Eager autograd keeps h (for α's gradient), x and the blend z (LayerNorm's input). This
keeps h, x (which the layer keeps anyway) and LayerNorm's per-position mean and 1/std,
and recomputes z in backward (one elementwise op): one tensor of the model's width per
position and layer fewer.

    y = blend_norm(h, x, alpha, weight, bias, eps)   # == layer_norm(alpha*h + (1-alpha)*x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samout.ops.tracing import is_tracing


def blend_norm_ref(h: Tensor, x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(alpha * h + (1 - alpha) * x, weight.shape, weight, bias, eps)


class _BlendNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, x, alpha, weight, bias, eps):
        z = torch.lerp(x, h, alpha)
        y, mean, rstd = torch.native_layer_norm(z, weight.shape, weight, bias, eps)
        ctx.save_for_backward(h, x, alpha, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        h, x, alpha, weight, bias, mean, rstd = ctx.saved_tensors
        z = torch.lerp(x, h, alpha)  # recomputed instead of kept
        gz, gw, gb = torch.ops.aten.native_layer_norm_backward(
            gy.contiguous(), z, weight.shape, mean, rstd, weight, bias, [True, True, True])
        galpha = (gz * (h - x)).sum().reshape(alpha.shape)
        return gz * alpha, gz * (1 - alpha), galpha, gw, gb, None


def blend_norm(h: Tensor, x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    if torch.is_autocast_enabled(h.device.type) or h.dtype != x.dtype or is_tracing():
        return blend_norm_ref(h, x, alpha, weight, bias, eps)
    return _BlendNorm.apply(h, x, alpha, weight, bias, eps)
