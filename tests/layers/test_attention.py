"""The attention layer of hybrid models: causal, windowed, chunkable, both kernels."""

import random

import pytest
import torch

from samout.config import KERNELS, SamOutConfig
from samout.layers.attention import CausalAttention, visible
from samout.layers.kv_cache import kv_buffer
from tests.helpers import random_chunks


def _attention(window=None, kernel="fused") -> CausalAttention:
    config = SamOutConfig.from_preset("tiny", hidden_size=48, num_heads=6, kernel=kernel,
                                      attention_every=2, attention_window=window)
    return CausalAttention(config)


def test_visible_mask():
    assert visible(0, 4, None).tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    # Two cached keys, two new queries, window 2: each query sees itself and one before.
    assert visible(2, 2, 2).tolist() == [[False, True, True, False], [False, False, True, True]]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [None, 1, 3, 8, 40])
def test_chunked_and_step_forms_equal_the_full_call(seed, window, kernel):
    rng = random.Random(seed)
    attn = _attention(window, kernel).double()
    x = torch.randn(2, 31, 48, dtype=torch.float64)
    with torch.no_grad():
        full, full_state = attn(x)
        for chunks in (random_chunks(31, rng), [1] * 31):
            outs, state, t = [], None, 0
            for n in chunks:
                y, state = attn(x[:, t : t + n], state)
                outs.append(y)
                t += n
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
            for name in ("key", "value"):  # a Linear on another shape may round differently
                torch.testing.assert_close(state[name], full_state[name], rtol=1e-12, atol=1e-12)
    kept = 31 if window is None else min(31, window - 1)
    assert full_state["key"].shape == (2, 6, kept, 8)


@pytest.mark.parametrize("window", [None, 4])
def test_fused_equals_reference_outputs_and_gradients(seed, window):
    fast, ref = _attention(window, "fused").double(), _attention(window, "reference").double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    with torch.no_grad():
        _, past = fast(torch.randn(2, 5, 48, dtype=torch.float64))
    results = []
    for module in (fast, ref):
        for state in (None, past):
            xs = x.clone().requires_grad_()
            y, _ = module(xs, state)
            grads = torch.autograd.grad(y.square().sum(), [xs, *module.parameters()])
            results.append((y, grads))
    for (y, g), (y_ref, g_ref) in zip(results[:2], results[2:]):
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_causal_and_window_bounded(seed):
    attn = _attention(window=3)
    x = torch.randn(1, 10, 48)
    other = x.clone()
    other[:, 4] += 1.0
    with torch.no_grad():
        a, _ = attn(x)
        b, _ = attn(other)
    changed = ((a - b).abs().amax(-1) > 0)[0].tolist()
    assert changed == [False] * 4 + [True] * 3 + [False] * 3  # positions 4, 5, 6 see position 4


@pytest.mark.parametrize("window", [None, 6])
def test_preallocated_cache_equals_concatenation(seed, window):
    """Outside autograd the unwindowed cache is written in place (kv_cache.py); outputs
    and states equal the concatenating reference exactly, and an older state stays valid."""
    rng = random.Random(seed)
    attn, ref = _attention(window), _attention(window)
    ref.load_state_dict(attn.state_dict())
    ref.set_kv_cache("concat")
    x = torch.randn(2, 40, 48)
    with torch.no_grad():
        for chunks in (random_chunks(40, rng), [1] * 40):
            state = ref_state = None
            t = 0
            for n in chunks:
                y, state = attn(x[:, t : t + n], state)
                y_ref, ref_state = ref(x[:, t : t + n], ref_state)
                assert torch.equal(y, y_ref)
                for name in ("key", "value"):
                    assert torch.equal(state[name], ref_state[name])
                t += n
            assert (kv_buffer(state["key"]) is not None) == (window is None)
            assert kv_buffer(ref_state["key"]) is None
        _, prefix = attn(x[:, :10])
        snapshot = {k: v.clone() for k, v in prefix.items()}
        y_a, _ = attn(x[:, 10:12], prefix)  # writes into prefix's buffer
        y_b, _ = attn(x[:, 20:23], prefix)  # a branch from the same prefix: must copy
        _, ref_prefix = ref(x[:, :10])
        assert torch.equal(y_b, ref(x[:, 20:23], ref_prefix)[0])
        assert all(torch.equal(prefix[k], snapshot[k]) for k in snapshot)


def test_unknown_kv_cache_is_refused():
    with pytest.raises(ValueError, match="unknown kv cache"):
        _attention().set_kv_cache("paged")
