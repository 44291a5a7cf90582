import importlib

import pytest
import torch

from samout.ops import running_max, running_max_ref


def _no_ties(*shapes, dtype=torch.float64):
    """Tensors of these shapes whose values are all distinct (one random permutation
    shared between them), so that every gradient is well defined."""
    sizes = [torch.Size(s).numel() for s in shapes]
    values = torch.randperm(sum(sizes)).to(dtype) / sum(sizes) - 0.5
    return [v.reshape(s) for v, s in zip(values.split(sizes), shapes)]


@pytest.mark.parametrize("dim", [1, 2, -1])
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_equals_reference_values(seed, dim, with_state):
    x = torch.randn(3, 11, 4, 5)
    state_shape = list(x.shape)
    state_shape.pop(dim)
    state = torch.randn(state_shape) if with_state else None
    fast = running_max(x, state, dim=dim)
    ref = running_max_ref(x, state, dim=dim)
    assert torch.equal(fast, ref)
    if with_state:
        # The state really matters: some outputs come from it.
        assert not torch.equal(fast, running_max(x, None, dim=dim))


@pytest.mark.parametrize("with_state", [False, True])
def test_fast_equals_reference_gradients(seed, with_state):
    x, state = _no_ties((2, 9, 3, 4), (2, 3, 4))
    x.requires_grad_()
    state = state.add(0.3).requires_grad_() if with_state else None
    g = torch.randn(2, 9, 3, 4, dtype=torch.float64)
    inputs = [x] + ([state] if state is not None else [])
    fast = torch.autograd.grad((running_max(x, state) * g).sum(), inputs)
    ref = torch.autograd.grad((running_max_ref(x, state) * g).sum(), inputs)
    # Same routing; the sums may be added in another order, hence float64 rounding.
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(a != 0, b != 0)
    if with_state:
        assert fast[1].abs().sum() > 0  # the state received some gradient


@pytest.mark.parametrize("fn", [running_max, running_max_ref])
def test_gradcheck(seed, fn):
    x, state = _no_ties((2, 7, 3), (2, 3))
    x.requires_grad_()
    state.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: fn(a, None, 1), (x,))
    assert torch.autograd.gradcheck(lambda a, s: fn(a, s, 1), (x, state))


@pytest.mark.parametrize("fn", [running_max, running_max_ref])
def test_ties_send_gradient_to_most_recent_position(fn):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = fn(x, None, 1)
    assert out.tolist() == [[1.0, 3.0, 3.0, 3.0, 3.0, 3.0]]
    # Output t's gradient goes to the latest position <= t holding the max.
    g = torch.tensor([[1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * g).sum(), x)
    assert grad.tolist() == [[1.0, 10.0, 1100.0, 0.0, 110000.0, 0.0]]


@pytest.mark.parametrize("fn", [running_max, running_max_ref])
def test_ties_with_state_prefer_the_chunk(fn):
    state = torch.tensor([[3.0]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[[2.0], [3.0], [1.0]]], dtype=torch.float64, requires_grad=True)
    out = fn(x, state, 1)
    assert out.flatten().tolist() == [3.0, 3.0, 3.0]
    gx, gs = torch.autograd.grad(out.sum(), [x, state])
    # Position 0 is below the state: its output comes from the state. Position 1 ties
    # with the state and, being newer, takes the gradient of outputs 1 and 2.
    assert gs.item() == 1.0
    assert gx.flatten().tolist() == [0.0, 2.0, 0.0]


def test_random_ties_fast_equals_reference(seed):
    # Small integers force many ties; both paths must route gradients the same way.
    x = torch.randint(0, 4, (3, 20, 5)).double().requires_grad_()
    state = torch.randint(0, 4, (3, 5)).double().requires_grad_()
    g = torch.randn(3, 20, 5, dtype=torch.float64)
    fast = torch.autograd.grad((running_max(x, state) * g).sum(), [x, state])
    ref = torch.autograd.grad((running_max_ref(x, state) * g).sum(), [x, state])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(a != 0, b != 0)


def test_chunked_equals_full(seed):
    x = torch.randn(2, 30, 6)
    full = running_max(x)
    state, parts = None, []
    for a, b in [(0, 1), (1, 8), (8, 9), (9, 30)]:
        out = running_max(x[:, a:b], state)
        state = out[:, -1]
        parts.append(out)
    assert torch.equal(torch.cat(parts, 1), full)


# -- the forgetting running max (decay) ------------------------------------------------

from samout.ops import running_max_cummax  # noqa: E402
from samout.ops.running_max.blocked import blocked_running_max  # noqa: E402
from tests.helpers import random_chunks  # noqa: E402

reference = importlib.import_module("samout.ops.running_max.reference")
DECAY_FNS = [running_max, running_max_cummax, running_max_ref]


@pytest.fixture(params=[256, 4])
def decay_chunk(request, monkeypatch):
    """The real piece length, and a tiny one so the tests' short inputs cross pieces."""
    monkeypatch.setattr(reference, "DECAY_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("fn", DECAY_FNS)
@pytest.mark.parametrize("with_state", [False, True])
def test_zero_decay_is_bit_identical(seed, fn, with_state, decay_chunk):
    x = torch.randn(3, 17, 5)
    state = torch.randn(3, 5) if with_state else None
    assert torch.equal(fn(x, state, 1, torch.zeros(5)), fn(x, state, 1))


@pytest.mark.parametrize("fn", [running_max, running_max_cummax])
@pytest.mark.parametrize("with_state", [False, True])
def test_decay_equals_the_recurrence(seed, fn, with_state, decay_chunk):
    x = torch.randn(2, 19, 3, 4, dtype=torch.float64)
    state = torch.randn(2, 3, 4, dtype=torch.float64) if with_state else None
    decay = torch.rand(3, 4, dtype=torch.float64) * 0.3
    got = fn(x, state, 1, decay)
    want = running_max_ref(x, state, 1, decay)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(got, fn(x, state, 1))  # the decay really changes the result


@pytest.mark.parametrize("with_state", [False, True])
def test_decay_gradients_equal_the_reference(seed, with_state, decay_chunk):
    x, state = _no_ties((2, 13, 3, 4), (2, 3, 4))
    x.requires_grad_()
    state = state.add(0.3).requires_grad_() if with_state else None
    # Continuous δ: x - k δ never ties exactly with another x (a δ on x's grid could).
    decay = torch.rand(3, 4, dtype=torch.float64).mul(0.1).requires_grad_()
    g = torch.randn(2, 13, 3, 4, dtype=torch.float64)
    inputs = [x, decay] + ([state] if state is not None else [])
    results = [torch.autograd.grad((fn(x, state, 1, decay) * g).sum(), inputs) for fn in DECAY_FNS]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert results[0][1].abs().sum() > 0  # δ received gradient


@pytest.mark.parametrize("fn", DECAY_FNS)
def test_decay_gradcheck(seed, fn, decay_chunk):
    x, state = _no_ties((2, 9, 3), (2, 3))
    decay = torch.rand(3, dtype=torch.float64).mul(0.05)  # continuous: no ties (see above)
    args = (x.requires_grad_(), state.requires_grad_(), decay.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, s, d: fn(a, s, 1, d), args)
    assert torch.autograd.gradcheck(lambda a, d: fn(a, None, 1, d), (x, decay))


def test_decay_chunked_equals_full_for_any_chunking(seed, decay_chunk):
    import random

    rng = random.Random(seed)
    x = torch.randn(2, 40, 6)
    decay = torch.rand(6) * 0.2
    full = running_max(x, None, 1, decay)
    for chunks in (random_chunks(40, rng), [1] * 40):
        state, parts, t = None, [], 0
        for n in chunks:
            out = running_max(x[:, t : t + n], state, 1, decay)
            state, t = out[:, -1], t + n
            parts.append(out)
        # Pieces fall elsewhere, so x + s δ rounds elsewhere: float32 rounding of values up
        # to |x| + 40 δ (about 10), nothing more.
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_decay_keeps_float32_precision_on_long_sequences(seed):
    # 20k steps with δ = 0.5: a shift counted from the start of the sequence would reach
    # 1e4 and cost float32 about 1e-3 of absolute precision; pieces keep it at the inputs'.
    x = torch.randn(1, 20_000, 4)
    decay = torch.full((4,), 0.5)
    want = running_max_ref(x.double(), None, 1, decay.double())
    for fn in (running_max, running_max_cummax):
        assert (fn(x, None, 1, decay).double() - want).abs().max() < 1e-5


# -- the blocked scan's edges, and the one public function --------------------------


@pytest.mark.parametrize("t", [1, 2, 3, 4, 8, 15, 16, 17, 63, 64, 65])
def test_running_max_block_edges(seed, t):
    # The blocked scan splits time into sqrt(T) blocks plus a tail: probe every edge.
    x = torch.randint(0, 6, (2, t, 5)).double().requires_grad_()
    state = torch.randint(0, 6, (2, 5)).double().requires_grad_()
    g = torch.randn(2, t, 5, dtype=torch.float64)
    for s in (None, state):
        out = running_max(x, s)
        assert torch.equal(out, running_max_ref(x, s))
        ins = [x] + ([s] if s is not None else [])
        fast = torch.autograd.grad((out * g).sum(), ins)
        ref = torch.autograd.grad((running_max_cummax(x, s) * g).sum(), ins)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            assert torch.equal(a != 0, b != 0)


def test_running_max_keeps_no_integer_tensors_for_backward(seed):
    x = torch.randn(2, 50, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        running_max(x, torch.randn(2, 8)).sum().backward()
    assert saved and all(t.is_floating_point() for t in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        running_max_cummax(x).sum()
    assert any(t.dtype == torch.int64 for t in saved)  # what the reference keeps


@pytest.mark.parametrize("decay", [False, True])
def test_running_max_dispatches_on_the_kernel_setting(seed, decay):
    x = torch.randn(2, 9, 5)
    state = torch.randn(2, 5)
    d = torch.rand(5) * 0.1 if decay else None
    want = {"reference": running_max_cummax(x, state, 1, d), "fused": blocked_running_max(x, state, 1, d)}
    want["auto"] = want["fused"]  # CPU tensors
    for kernel, m in want.items():
        assert torch.equal(running_max(x, state, 1, d, kernel=kernel), m)
