"""The output head and the cross-entropy loss in one function, without the logits.

    loss = linear_cross_entropy(x, weight, targets)   # == cross_entropy(x @ weight.T, targets)
    x: [N, D] final hidden states; weight: [V, D] the head; targets: [N] (ignore_index skipped)

Training keeps the [N, V] logits for backward (the log-softmax) and makes another [N, V]
for their gradient: at 1024 tokens and a vocabulary of 8192, 64 MiB, the largest single
item of a small model's training memory. Because the loss is the last operation, its
gradient is known in the forward pass (softmax - one-hot, over the count of targets), so
this computes it there, a chunk of rows at a time, and turns it at once into the
gradients of x ([N, D]) and of the weight ([V, D], the size of the head's own gradient);
the logits of one chunk (a few MiB) are all that ever exist. Backward only scales the two
saved gradients by the incoming one. The same matrix products as the plain form, so it
costs no time (the "fused linear cross-entropy" of Liger-Kernel, here in plain PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samout.ops.tracing import is_tracing

CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MiB in float32)


def linear_cross_entropy_ref(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """The plain form: logits, then the mean cross-entropy over the targets not ignored."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)


def _chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, vocab))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        valid = targets != ignore_index
        count = valid.sum()
        safe = targets.masked_fill(~valid, 0)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x)
        gw = torch.zeros_like(weight)
        scale = 1.0 / count.clamp_min(1).float()
        for rows in _chunks(x.shape[0], weight.shape[0]):
            logits = x[rows] @ weight.t()  # [n, V]
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, safe[rows, None]).squeeze(1)
            total += ((lse - picked) * valid[rows]).sum()
            # d loss / d logits = (softmax - one-hot) / count, zero on ignored rows.
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, safe[rows, None], torch.full_like(picked[:, None], -1.0))
            probs.mul_((valid[rows] * scale).to(probs.dtype)[:, None])
            torch.mm(probs, weight, out=gx[rows])
            gw.addmm_(probs.t(), x[rows])
        ctx.save_for_backward(gx, gw)
        return total / count  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad: Tensor):
        gx, gw = ctx.saved_tensors
        return gx * grad, gw * grad, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of `x @ weight.T` against `targets` (see the module doc). Falls back
    to the plain form under autocast (its casting rules) and when nothing needs a gradient
    or the inputs are not float32."""
    if x.dim() != 2 or weight.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy takes x [N, D], weight [V, D] and targets [N], got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    fused = (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
             and x.dtype == weight.dtype == torch.float32
             and not torch.is_autocast_enabled(x.device.type)
             and not is_tracing())
    if not fused:
        return linear_cross_entropy_ref(x, weight, targets, ignore_index)
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index)
