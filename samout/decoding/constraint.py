"""Token constraints: what a grammar engine (structured output, tool calls) gives the decoding
core. A constraint belongs to one sequence; the core asks it for the allowed tokens before
each sample and tells it which token was picked.

The allowed set travels as a packed bitmask, the layout grammar engines use (llguidance,
xgrammar): int32 words, bit `t % 32` of word `t // 32` set when token `t` is allowed, one row
per sequence of the batch, so a batch's masks are filled in place and applied in one op.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


@runtime_checkable
class TokenConstraint(Protocol):
    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (int32 [batch, words], CPU)."""

    def advance(self, token: int) -> None:
        """The sequence took `token` (one the last mask allowed)."""

    def is_finished(self) -> bool:
        """The grammar is complete: the sequence ends here (finish reason "stop")."""


def bitmask_to_bool_ref(bitmask: Tensor, vocab_size: int) -> Tensor:
    """bool [batch, vocab_size] from int32 [batch, words]: the plain reference."""
    bits = torch.arange(32, dtype=torch.int64)
    words = bitmask.to(torch.int64) & 0xFFFFFFFF
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    return allowed[:, :vocab_size]


def apply_bitmask_ref(logits: Tensor, bitmask: Tensor) -> Tensor:
    """logits [batch, vocab] with the tokens a row's mask forbids set to -inf (a copy)."""
    allowed = bitmask_to_bool_ref(bitmask, logits.shape[-1])
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
