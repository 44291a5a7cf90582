"""Each mixer, given the same projected streams, is bit-identical between its full,
chunked and one-step forms: the running max is exact and the rest is per position."""

import random

import pytest
import torch

from samout.config import MIXERS, SamOutConfig
from samout.layers import build_mixer


def _mixer(name: str):
    config = SamOutConfig.from_preset("tiny", mixer=name, hidden_size=48, num_heads=6)
    mixer = build_mixer(config)
    with torch.no_grad():  # move the alphas off 0.5 so every term is exercised
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


def _random_split(total: int) -> list[int]:
    cuts = sorted(random.sample(range(1, total), k=random.randint(1, min(6, total - 1))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


@pytest.mark.parametrize("name", MIXERS)
def test_full_chunked_and_step_forms_are_bit_identical(seed, name):
    random.seed(seed)
    mixer = _mixer(name)
    x = torch.randn(3, 29, 48)
    with torch.no_grad():
        streams = mixer.project(x)
        full, full_state = mixer.mix(streams)

        chunks, state, t = [], None, 0
        for n in _random_split(29):
            y, state = mixer.mix(streams[:, t : t + n], state)
            chunks.append(y)
            t += n
        assert torch.equal(torch.cat(chunks, 1), full)
        assert torch.equal(state, full_state)

        steps, state = [], None
        for t in range(29):
            y, state = mixer.mix(streams[:, t : t + 1], state)
            steps.append(y)
        assert torch.equal(torch.cat(steps, 1), full)
        assert torch.equal(state, full_state)


@pytest.mark.parametrize("name", MIXERS)
def test_state_is_the_running_max_of_one_stream(seed, name):
    mixer = _mixer(name)
    with torch.no_grad():
        streams = mixer.project(torch.randn(2, 13, 48))
        _, state = mixer.mix(streams)
    expected = streams[:, :, mixer.max_stream].amax(dim=1)
    assert torch.equal(state, expected)


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_gradients_match_full_vs_chunked(seed, name):
    mixer = _mixer(name).double()
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    streams = mixer.project(x).detach().requires_grad_()
    g = torch.randn(2, 17, 6, 8, dtype=torch.float64)
    full, _ = mixer.mix(streams)
    (g_full,) = torch.autograd.grad((full * g).sum(), streams)
    a, state = mixer.mix(streams[:, :7])
    b, _ = mixer.mix(streams[:, 7:], state)
    (g_chunk,) = torch.autograd.grad((torch.cat([a, b], 1) * g).sum(), streams)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-12, atol=1e-12)


def test_conv_mixer_slides_over_heads_not_time(seed):
    # Changing one head's streams at time t changes outputs of nearby heads at t only.
    mixer = _mixer("conv")
    with torch.no_grad():
        streams = mixer.project(torch.randn(1, 9, 48))
        # Keep time 4 of the max stream low in both runs, so the running max never
        # changes and only the per-position path is probed.
        streams[:, 4, mixer.max_stream, 2] = -100.0
        base, _ = mixer.mix(streams)
        others = [i for i in range(5) if i != mixer.max_stream]
        streams[:, 4, others, 2] += 1.0  # time 4, head 2
        moved, _ = mixer.mix(streams)
    diff = (moved - base).abs().amax(dim=-1)[0]  # [T, H]
    changed = (diff > 0).nonzero().tolist()
    assert changed and all(t == 4 for t, _ in changed)
    assert {h for _, h in changed} <= {0, 1, 2, 3, 4}
