"""The recurrent state carried between calls: a plain list of named tensors per layer.

    logits, state = model(ids)
    logits2, state2 = model(more_ids, state=state)   # == one call on ids + more_ids

Layout (batch dimension first in every tensor):

    SamOut        layers[i] = {"running_max": [B, H, dh]}       fixed size
    hybrid SamOut attention layers: {"key", "value": [B, H, T_kept, dh]}, T_kept <= W - 1
                  with an attention_window W (fixed), else every token (grows)
    Transformer   layers[i] = {"key": [B, H, T, dh], "value": [B, H, T, dh]}  grows with T

Everything a wrapper needs works on that plain structure: `index_select` reorders
the batch (beam search), `to_tensors` / `from_tensors` give flat names for
safetensors and for the explicit state inputs/outputs of an ONNX graph,
`State.stack` / `split` join per-sequence states along the batch and part them again.

`StateBatch` is how a model's per-sequence states go into one batched call (the serving
engine's decode step): states of equal shapes stack. A model whose states differ in
length (a Transformer's KV caches) names its own subclass as `state_batch`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class State:
    layers: list[dict[str, Tensor]]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.layers[i]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return iter(self.layers)

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers[0].values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def map(self, fn) -> State:
        """A new state with `fn` applied to every tensor."""
        return State([{k: fn(v) for k, v in layer.items()} for layer in self.layers])

    def index_select(self, index: Tensor) -> State:
        """Reorder / pick batch rows (beam search)."""
        return self.map(lambda t: t.index_select(0, index.to(t.device)))

    def to(self, *args, **kwargs) -> State:
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> State:
        return self.map(Tensor.detach)

    def clone(self) -> State:
        return self.map(Tensor.clone)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat `{"layers.{i}.{name}": tensor}`, e.g. for safetensors or ONNX names."""
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> State:
        layers: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
                raise ValueError(f"not a state tensor name: {key!r} (expected layers.<i>.<name>)")
            layers.setdefault(int(parts[1]), {})[parts[2]] = value
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"state layers are not numbered 0..n-1: {sorted(layers)}")
        return cls([layers[i] for i in range(len(layers))])

    def shapes(self) -> tuple:
        """The shapes of the tensors without the batch: states with equal shapes stack."""
        return tuple(tuple((k, tuple(v.shape[1:])) for k, v in layer.items()) for layer in self.layers)

    @classmethod
    def stack(cls, states: list[State]) -> State:
        """One batched state from states of equal shapes (batch first in every tensor); a
        single state comes back as it is, not copied."""
        if len(states) == 1:
            return states[0]
        return cls([{k: torch.cat([s[i][k] for s in states]) for k in states[0][i]}
                    for i in range(len(states[0]))])

    def split(self) -> list[State]:
        """Per-sequence states (batch 1 each, views of this one); a batch of one is itself."""
        if self.batch_size == 1:
            return [self]
        rows = [{k: v.split(1) for k, v in layer.items()} for layer in self.layers]
        return [State([{k: parts[j] for k, parts in layer.items()} for layer in rows])
                for j in range(self.batch_size)]

    def equal(self, other: State) -> bool:
        """Bitwise equality of every tensor."""
        a, b = self.to_tensors(), other.to_tensors()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_state_layers(state: State | None, num_layers: int) -> None:
    """A model's first check of a `state` argument: None or a State with one entry per layer."""
    if state is not None and (not isinstance(state, State) or len(state) != num_layers):
        raise ValueError(
            f"state must be a samout State with {num_layers} layers, got "
            f"{type(state).__name__} with {len(state) if isinstance(state, State) else '?'}"
        )


class StateBatch:
    """Per-sequence states (batch 1 each) as one batched state for repeated model calls.

    The default stacks states of equal shapes (SamOut's fixed-size states; a hybrid's
    attention layers of equal lengths). `key` says which states can share a batch,
    `model_kwargs` what the model call needs besides the state, `advance` takes the state
    the call returned, and `rows` gives each sequence's own state back.
    """

    def __init__(self, states: list[State]) -> None:
        self.state = State.stack(states)

    @staticmethod
    def key(state: State) -> Hashable:
        return state.shapes()

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def advance(self, state: State, new_tokens: int) -> None:
        self.state = state

    def rows(self) -> list[State]:
        return self.state.split()

    @property
    def nbytes(self) -> int:
        return self.state.nbytes
