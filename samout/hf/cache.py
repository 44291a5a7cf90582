"""`SamOutCache`: samout's recurrent state as a `transformers` cache.

A KV cache grows by one key and value per token; SamOut's state is one running max per
layer, `[B, H, dh]`, whatever the number of tokens. The cache wraps a `samout.state.State`
and counts the tokens it has absorbed, so `get_seq_length()` tells `generate()` how far
the prompt has been consumed while the tensors never grow. Beam search reorders it with
`reorder_cache` (`State.index_select`). A running max cannot forget a token, so `crop`
(used by assisted decoding to roll back rejected tokens) is refused.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from samout.state import State


class SamOutCache(Cache):
    def __init__(self, state: State | None = None, seen_tokens: int = 0) -> None:
        # No per-layer KV objects: the whole state lives in `self.state`.
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        layers = 0 if self.state is None else len(self.state)
        nbytes = 0 if self.state is None else self.state.nbytes
        return f"SamOutCache(layers={layers}, bytes={nbytes}, seen_tokens={self.seen_tokens})"

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state)

    def update_state(self, state: State, num_new_tokens: int) -> None:
        """Store the state after a forward call that consumed `num_new_tokens` tokens."""
        self.state = state
        self.seen_tokens += num_new_tokens

    # -- what generate() asks of a cache -------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state has a fixed size

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a SamOut state cannot be cropped: the running max cannot forget tokens "
            "(assisted / speculative decoding is not supported)"
        )

    def update(self, *args, **kwargs):
        raise TypeError("SamOutCache holds a running-max state, not keys and values; use update_state")

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False
