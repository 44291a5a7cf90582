"""State batching: stack per-sequence states, split them back, and the default StateBatch."""

from __future__ import annotations

import torch

from samout import SamOut, SamOutConfig
from samout.state import State, StateBatch


def _state(batch: int, t: int = 2) -> State:
    return State([{"running_max": torch.randn(batch, 2, 3)}, {"key": torch.randn(batch, 2, t, 3)}])


def test_stack_then_split_gives_the_states_back():
    states = [_state(1) for _ in range(3)]
    stacked = State.stack(states)
    assert stacked.batch_size == 3 and stacked.shapes() == states[0].shapes()
    assert all(a.equal(b) for a, b in zip(stacked.split(), states))


def test_one_state_is_neither_copied_nor_split():
    state = _state(1)
    assert State.stack([state]) is state and state.split() == [state]


def test_shapes_tell_which_states_stack():
    assert _state(1, t=2).shapes() != _state(1, t=3).shapes()
    assert _state(1).shapes() == _state(4).shapes()  # the batch is left out


def test_default_batch_steps_like_each_sequence_alone(seed):
    model = SamOut(SamOutConfig.from_preset("tiny")).eval()
    assert model.state_batch is StateBatch
    with torch.no_grad():
        states = [model(torch.randint(0, model.config.vocab_size, (1, n)))[1] for n in (2, 5)]
        batch = StateBatch(states)
        assert batch.model_kwargs() == {} and StateBatch.key(states[0]) == StateBatch.key(states[1])
        new = torch.randint(0, model.config.vocab_size, (2, 1))
        logits, state = model(new, batch.state)
        batch.advance(state, 1)
        for j, row in enumerate(batch.rows()):
            alone, want = model(new[j:j + 1], states[j])
            assert torch.allclose(logits[j:j + 1], alone, atol=1e-5) and row.shapes() == want.shapes()
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(row.to_tensors().values(),
                                                                        want.to_tensors().values()))
