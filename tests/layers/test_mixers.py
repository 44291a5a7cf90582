"""Each mixer, given the same projected streams, is bit-identical between its full,
chunked and one-step forms: the running max is exact and the rest is per position."""

import random

import pytest
import torch

from samout.config import MIXERS, SamOutConfig
from samout.layers import build_mixer
from tests.helpers import random_chunks

# The kernels that run on CPU without the Triton interpreter ("triton": tests/ops/test_triton.py).
KERNELS = ("auto", "fused", "reference")


def _mixer(name: str, kernel: str = "fused", decay: bool = False):
    config = SamOutConfig.from_preset("tiny", mixer=name, hidden_size=48, num_heads=6, kernel=kernel,
                                      max_decay=decay, max_decay_init=0.05)
    mixer = build_mixer(config)
    with torch.no_grad():  # move the alphas off 0.5 so every term is exercised
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


def _same(a, b, decay: bool) -> bool:
    # Without decay: bit for bit. With it, the shifts x + s δ are counted from each call's
    # start, so they round differently: equal to float32 rounding.
    if not decay:
        return torch.equal(a, b)
    return bool((a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()))


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", MIXERS)
def test_full_chunked_and_step_forms_are_bit_identical(seed, name, kernel, decay):
    rng = random.Random(seed)
    mixer = _mixer(name, kernel, decay)
    x = torch.randn(3, 29, 48)
    with torch.no_grad():
        streams = mixer.project(x)
        full, full_state = mixer.mix(streams)

        chunks, state, t = [], None, 0
        for n in random_chunks(29, rng, max_cuts=6):
            y, state = mixer.mix(streams[:, t : t + n], state)
            chunks.append(y)
            t += n
        assert _same(torch.cat(chunks, 1), full, decay)
        assert _same(state, full_state, decay)

        steps, state = [], None
        for t in range(29):
            y, state = mixer.mix(streams[:, t : t + 1], state)
            steps.append(y)
        assert _same(torch.cat(steps, 1), full, decay)
        assert _same(state, full_state, decay)


@pytest.mark.parametrize("name", MIXERS)
def test_state_is_the_running_max_of_one_stream(seed, name):
    mixer = _mixer(name)
    with torch.no_grad():
        streams = mixer.project(torch.randn(2, 13, 48))
        _, state = mixer.mix(streams)
    expected = streams[:, :, mixer.max_stream].amax(dim=1)
    assert torch.equal(state, expected)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", MIXERS)
def test_mixer_gradients_match_full_vs_chunked(seed, name, kernel, decay):
    mixer = _mixer(name, kernel, decay).double()
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


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("name", MIXERS)
def test_fused_kernel_equals_reference(seed, name, decay):
    # Same weights, both kernels: outputs, states and every gradient (input, incoming
    # state, all parameters, δ's θ included) agree; the state (a running max) is
    # bit-identical without decay.
    fast = _mixer(name, "fused", decay).double()
    ref = _mixer(name, "reference", decay).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 21, 48, dtype=torch.float64)
    state = torch.randn(2, 6, 8, dtype=torch.float64)
    g = torch.randn(2, 21, 48, dtype=torch.float64)
    results = []
    for mixer in (fast, ref):
        xs, ss = x.clone().requires_grad_(), state.clone().requires_grad_()
        y, new_state = mixer(xs, ss)
        params = list(mixer.parameters())
        grads = torch.autograd.grad((y * g).sum() + new_state.sum(), [xs, ss] + params)
        results.append((y, new_state, grads))
    (y, s, grads), (y_ref, s_ref, grads_ref) = results
    assert torch.equal(s, s_ref) if not decay else torch.allclose(s, s_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel 'cuda': choose one of auto, fused, reference"):
        SamOutConfig(kernel="cuda")
    with pytest.raises(ValueError, match="unknown kernel"):
        _mixer("gen4").set_kernel("nope")


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("name", MIXERS)
def test_bfloat16_autocast_trains_with_both_kernels(seed, name, decay):
    # The fused kernels must accept bf16 streams from an autocast projection with fp32
    # parameters, and give the same forward as the reference under the same autocast.
    mixer = _mixer(name, decay=decay)
    x = torch.randn(2, 11, 48)
    outs = {}
    for kernel in ("reference", "fused"):
        mixer.set_kernel(kernel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = mixer(x)
        y.float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())
        mixer.zero_grad()
        outs[kernel] = y.float()
    # Same values to bf16 precision (the polynomial's terms are rounded in another order).
    scale = outs["reference"].abs().max()
    assert (outs["fused"] - outs["reference"]).abs().max() <= 2e-2 * scale


def test_the_registry_implements_exactly_the_configs_mixer_names():
    from samout.layers.mixers import MIXER_CLASSES

    assert tuple(MIXER_CLASSES) == MIXERS
