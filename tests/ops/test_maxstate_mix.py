"""samout.ops.maxstate_mix: the fused kernels and the one-token step against the eager
reference: outputs, states and gradients (streams, incoming state, alphas, head-mix
weight), ties included."""

import importlib

import pytest
import torch

from samout.ops.maxstate_mix import fused_mix, gen4_ref, maxstate_mix, mix_ref, mix_step
from samout.ops.maxstate_mix.fused import gen4_forward
from samout.ops.running_max import running_max_ref

KINDS = {"gen3": (3, 5), "gen4": (4, 3), "openash": (4, 3)}


def _inputs(kind, b=2, t=13, h=3, dh=4, dtype=torch.float64, ties=False):
    k, n_alpha = KINDS[kind]
    streams = torch.randn(b, t, k, h, dh, dtype=dtype)
    state = torch.randn(b, h, dh, dtype=dtype)
    if ties:  # small integers in the max stream and state: many ties, with the state too
        streams[:, :, 2] = torch.randint(0, 3, (b, t, h, dh)).to(dtype)
        state = torch.randint(0, 3, (b, h, dh)).to(dtype)
    alpha = 0.5 + 0.3 * torch.randn(n_alpha, dtype=dtype)
    weight = torch.randn(h, 5 * h, dtype=dtype) / 4 if kind == "openash" else None
    return streams, state, alpha, weight


def _grads(fn, kind, streams, state, alpha, weight, gy, gs, decay=None):
    leaves = [v.detach().clone().requires_grad_() for v in (streams, state, alpha)]
    w = weight.detach().clone().requires_grad_() if weight is not None else None
    d = decay.detach().clone().requires_grad_() if decay is not None else None
    y, new_state = fn(kind, leaves[0], leaves[1], leaves[2], w, d)
    loss = (y * gy).sum() + (new_state * gs).sum()
    extra = [v for v in (w, d) if v is not None]
    grads = torch.autograd.grad(loss, leaves + extra)
    return y.detach(), new_state.detach(), grads


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("ties", [False, True])
def test_fused_equals_reference(seed, kind, ties, decay, monkeypatch):
    if decay:  # pieces of 5 steps, so the chunk-relative offsets are exercised
        monkeypatch.setattr(importlib.import_module("samout.ops.running_max.reference"), "DECAY_CHUNK", 5)
    t = int(torch.randint(1, 40, ()).item())
    streams, state, alpha, weight = _inputs(kind, t=t, ties=ties)
    d = torch.rand(3, 4, dtype=torch.float64) * 0.2 if decay else None
    gy = torch.randn(2, t, 3, 4, dtype=torch.float64)
    gs = torch.randn(2, 3, 4, dtype=torch.float64)
    y, s, grads = _grads(fused_mix, kind, streams, state, alpha, weight, gy, gs, d)
    y_ref, s_ref, grads_ref = _grads(mix_ref, kind, streams, state, alpha, weight, gy, gs, d)
    if decay:
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
        # And both against the float64 recurrence.
        want = running_max_ref(streams[:, :, 2], state, 1, d)[:, -1]
        torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["streams", "state", "alpha", "weight/decay", "decay"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
    assert grads[1].abs().sum() > 0  # the incoming state really received gradient
    if decay:
        assert grads[-1].abs().sum() > 0  # and δ too


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_zero_decay_is_bit_identical(seed, kind):
    streams, state, alpha, weight = _inputs(kind, t=29, dtype=torch.float32)
    zero = torch.zeros(3, 4)
    for fn in (fused_mix, mix_ref):
        with torch.no_grad():
            y, s = fn(kind, streams, state, alpha, weight)
            y0, s0 = fn(kind, streams, state, alpha, weight, zero)
        assert torch.equal(y, y0) and torch.equal(s, s0)
        # The autograd path too.
        y1, s1 = fn(kind, streams.clone().requires_grad_(), state, alpha, weight, zero)
        assert torch.equal(y1.detach(), y) and torch.equal(s1.detach(), s)


def test_openash_head_mix_in_chunks(seed, monkeypatch):
    # The head mixing works through chunks of positions; force several, uneven ones.
    fm = importlib.import_module("samout.ops.maxstate_mix.fused")

    monkeypatch.setattr(fm, "HEAD_MIX_CHUNK", 4 * 7)  # 7 positions of dh = 4 per chunk
    streams, state, alpha, weight = _inputs("openash", t=13)  # 26 positions: 7+7+7+5
    gy = torch.randn(2, 13, 3, 4, dtype=torch.float64)
    gs = torch.randn(2, 3, 4, dtype=torch.float64)
    y, s, grads = _grads(fused_mix, "openash", streams, state, alpha, weight, gy, gs)
    y_ref, s_ref, grads_ref = _grads(mix_ref, "openash", streams, state, alpha, weight, gy, gs)
    assert len(fm._row_chunks(26, 4)) == 4
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_without_state_and_float32(seed, kind):
    streams, _, alpha, weight = _inputs(kind, t=33, dtype=torch.float32)
    with torch.no_grad():
        y, s = fused_mix(kind, streams, None, alpha, weight)
        y_ref, s_ref = mix_ref(kind, streams, None, alpha, weight)
    assert torch.equal(s, s_ref)  # the running max is exact
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # The autograd path returns the same values as the no-grad path.
    y2, s2 = fused_mix(kind, streams.requires_grad_(), None, alpha, weight)
    assert torch.equal(y2.detach(), y) and torch.equal(s2.detach(), s)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_gradcheck(seed, kind, decay):
    streams, state, alpha, weight = _inputs(kind, b=1, t=6, h=2, dh=2)
    # Distinct values in the max stream and state: the max is differentiable there.
    distinct = (torch.randperm(28).double() / 28 - 0.5).reshape(1, 7, 2, 2)
    streams[:, :, 2] = distinct[:, :6]
    state = distinct[:, 6].clone()
    args = [streams.requires_grad_(), state.requires_grad_(), alpha.requires_grad_(), weight]
    if weight is not None:
        weight.requires_grad_()
    # A continuous δ (no exact ties of c_s - k δ with another c); [H, dh].
    args.append(torch.rand(2, 2, dtype=torch.float64).mul(0.05).requires_grad_() if decay else None)

    def fn(*a):
        return fused_mix(kind, *a)

    assert torch.autograd.gradcheck(fn, tuple(args))


def test_fused_tie_rule_state_is_oldest():
    # gen4 with a = b = d = 0 gives y = c * e: dy/dc = e directly, dy/de = c.
    streams = torch.zeros(1, 3, 4, 1, 1, dtype=torch.float64)
    streams[0, :, 2, 0, 0] = torch.tensor([2.0, 3.0, 1.0])
    state = torch.full((1, 1, 1), 3.0, dtype=torch.float64, requires_grad=True)
    streams.requires_grad_()
    y, _ = fused_mix("gen4", streams, state, torch.full((3,), 0.5, dtype=torch.float64))
    gx, gstate = torch.autograd.grad(y.sum(), [streams, state])
    # e = [3, 3, 3]. Output 0 comes from the state (2 < 3); position 1 ties with the
    # state and, being newer, takes the gradients of outputs 1 and 2 (c_1 + c_2 = 4).
    assert gstate.item() == 2.0
    assert gx[0, :, 2, 0, 0].tolist() == [3.0, 3.0 + 4.0, 3.0]


@pytest.mark.filterwarnings("ignore")  # torch.jit.trace's deprecation and tracer warnings
def test_traced_graphs_use_the_loop_free_form(seed):
    # The blocked scan unrolls a Python loop over time; under tracing the kernels fall
    # back to the cummax form, so a graph traced at one length works at another.
    streams, state, alpha, _ = _inputs("gen4", t=5, dtype=torch.float32)
    traced = torch.jit.trace(lambda s, st: fused_mix("gen4", s, st, alpha), (streams, state))
    longer, _, _, _ = _inputs("gen4", t=11, dtype=torch.float32)
    y, new_state = traced(longer, state)
    y_ref, s_ref = mix_ref("gen4", longer, state, alpha)
    assert torch.equal(new_state, s_ref)
    torch.testing.assert_close(y, y_ref)


# -- the one public function, and the restatements of the polynomial ------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_maxstate_mix_dispatches_on_the_kernel_setting(seed, kind):
    streams, state, alpha, weight = _inputs(kind, t=9)
    want = {"reference": mix_ref(kind, streams, state, alpha, weight),
            "fused": fused_mix(kind, streams, state, alpha, weight)}
    want["auto"] = want["fused"]  # CPU tensors
    for kernel, (y_want, s_want) in want.items():
        y, s = maxstate_mix(kind, streams, state, alpha, weight, kernel=kernel)
        assert torch.equal(y, y_want) and torch.equal(s, s_want)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("kind", ["gen4", "openash"])
def test_one_token_step_equals_the_reference(seed, kind, decay):
    # mix_step restates the gen4 polynomial with fused multiply-adds for decoding.
    streams, state, alpha, weight = _inputs(kind, t=1)
    d = torch.rand(3, 4, dtype=torch.float64) * 0.2 if decay else None
    for s in (None, state):
        y, new_state = mix_step(streams[:, 0], s, alpha, weight, d)
        y_ref, s_ref = mix_ref(kind, streams, s, alpha, weight, d)
        torch.testing.assert_close(y, y_ref[:, 0], rtol=1e-12, atol=1e-12)
        assert torch.equal(new_state, s_ref)


def test_fused_gen4_polynomial_equals_the_reference(seed):
    # gen4_forward restates gen4_ref in place, with plain binary ops.
    streams, _, alpha, _ = _inputs("gen4", t=7)
    e = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    got = gen4_forward(alpha, *streams.unbind(2), e)
    torch.testing.assert_close(got, gen4_ref(alpha, streams, e), rtol=1e-12, atol=1e-12)
