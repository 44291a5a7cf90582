"""Causal softmax attention as a SamOut layer's token mixer (hybrid models, issue 14).

    y, new_state = CausalAttention(config)(x, state)      # x [B, T, D], y [B, T, D]

It takes the place of the MaxStateSuper mixer inside a `DecoderLayer` (same residual,
FFN and LayerNorm around it), so a hybrid model is SamOut with some layers swapped.

Positions: none (NoPE). The maxstate layers below are causal and already make every
token's representation depend on what came before, so order reaches attention through
its inputs; no position is ever computed, so there is nothing the model has not seen at
4x or 16x the training length (the sinusoidal Transformer's weak spot there), the state
is only keys and values (no position counter to carry, save or export), and with a
sliding window a token's view is the same function of the last W tokens everywhere.
Causal attention without positional encoding is known to learn position from the causal
mask itself (Haviv et al. 2022; Kazemnejad et al. 2023).

Parameters: q, k, v and the output projection are D x D without bias, 4 D^2 in all:
exactly the fused 4-stream projection of gen4 / openash (openash adds 5 H^2 + 3 for its
head mixing and alphas), so a hybrid and the SamOut it comes from differ by a few hundred
parameters per swapped layer.

State: {"key": [B, H, T_kept, dh], "value": [B, H, T_kept, dh]}. With
`attention_window` W each token sees itself and the W - 1 tokens before it, and the
state keeps only the last W - 1 keys and values (what a future token can still see), so
it stays bounded; without a window it keeps everything (a KV cache), preallocated and
written in place outside autograd like the Transformer baseline's (kv_cache.py), so a
decode step copies one token's keys, not the whole cache. A windowed state is cut to its
last W - 1 keys each call (at most W - 1 copied per token, whatever the context).
`set_kv_cache("concat")` restores the plain concatenation, the reference.

Kernels: "fused" runs `F.scaled_dot_product_attention`; "reference" the textbook
softmax(q k^T / sqrt(dh) + mask) v, for the tests that compare the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samout.config import KERNELS, SamOutConfig
from samout.layers.kv_cache import append_kv, check_kv_cache

STATE_KEYS = ("key", "value")


def visible(past: int, t: int, window: int | None, device=None) -> Tensor:
    """Bool mask [t, past + t]: query i (at position past + i) sees key j iff
    j <= past + i and, with a window W, j > past + i - W."""
    q = torch.arange(past, past + t, device=device).unsqueeze(1)
    k = torch.arange(past + t, device=device).unsqueeze(0)
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


class CausalAttention(nn.Module):
    """Multi-head causal softmax attention, optional sliding window, no positions."""

    def __init__(self, config: SamOutConfig) -> None:
        super().__init__()
        self.kernel = config.kernel
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.window = config.attention_window
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.kv_cache = "preallocated"  # or "concat" (SamOut.set_kv_cache)

    def set_kv_cache(self, kind: str) -> None:
        self.kv_cache = check_kv_cache(kind)

    def set_kernel(self, kernel: str) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel = kernel

    def empty_state(self, batch_size: int, device=None, dtype=None) -> dict[str, Tensor]:
        shape = (batch_size, self.num_heads, 0, self.head_dim)
        return {name: torch.zeros(shape, device=device, dtype=dtype) for name in STATE_KEYS}

    def kept(self, total: int) -> int:
        """Keys and values the state keeps after `total` tokens."""
        return total if self.window is None else min(total, self.window - 1)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = 0 if state is None else state["key"].shape[2]
        in_place = (self.window is None and self.kv_cache == "preallocated"
                    and not (torch.is_grad_enabled() and k.requires_grad))  # autograd needs new tensors
        if in_place:
            k = append_kv(state["key"] if past else None, k)
            v = append_kv(state["value"] if past else None, v)
        elif past:
            k = torch.cat((state["key"], k), dim=2)
            v = torch.cat((state["value"], v), dim=2)
        y = self._attend(q, k, v, past)
        keep = self.kept(past + t)
        if keep == past + t:  # everything kept: the state is k and v themselves (in place: buffer views)
            new_state = {"key": k, "value": v}
        else:
            new_state = {"key": k[:, :, past + t - keep :], "value": v[:, :, past + t - keep :]}
        return self.out(y.transpose(1, 2).reshape(b, t, d)), new_state

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
        t = q.shape[2]
        if self.kernel == "reference":
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~visible(past, t, self.window, q.device), float("-inf"))
            return scores.softmax(-1) @ v
        if past == 0 and (self.window is None or self.window >= t):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if t == 1 and (self.window is None or self.window > past):
            return F.scaled_dot_product_attention(q, k, v)  # one new token sees every kept key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(past, t, self.window, q.device))
