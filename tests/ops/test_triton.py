"""The Triton kernels against the references, on CPU under the Triton interpreter:
outputs, states and gradients (ties included), chunked == full, one-token decode, and a
whole model with kernel="triton" against kernel="fused". Sizes stay small: the
interpreter runs each kernel program in numpy, step by step."""

import importlib
import importlib.util
import os
import random

import pytest
import torch

# Kernels are decorated for the interpreter only if this is set before their import.
os.environ["TRITON_INTERPRET"] = "1"

if importlib.util.find_spec("triton") is None:
    if os.environ.get("CI"):
        pytest.fail("triton is not installed: CI must run the Triton kernel tests "
                    "(pip install -e '.[all]')", pytrace=False)
    pytest.skip("triton is not installed (pip install 'samout[gpu]')", allow_module_level=True)

from samout import SamOut, SamOutConfig  # noqa: E402
from samout.config import MIXERS  # noqa: E402
from samout.ops.kernels import resolve_kernel  # noqa: E402
from samout.ops.maxstate_mix import mix_ref  # noqa: E402
from samout.ops.running_max import running_max_ref  # noqa: E402
from tests.helpers import random_chunks  # noqa: E402

# If an earlier test imported these modules without the interpreter, decorate them again.
trm = importlib.reload(importlib.import_module("samout.ops.running_max.triton"))
tmix = importlib.reload(importlib.import_module("samout.ops.maxstate_mix.triton"))


@pytest.fixture(autouse=True)
def scan_path():
    """Overrides tests/ops/conftest.py's: the CPU scan's two paths do not matter here."""


def test_kernels_run_in_the_interpreter():
    for kernel in (trm._scan_fwd_kernel, trm._scan_bwd_kernel, tmix._mix_fwd_kernel, tmix._mix_bwd_kernel):
        assert type(kernel).__name__ == "InterpretedFunction"


def _grads(fn, inputs, gout, gstate):
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in inputs]
    y, state = fn(*leaves)
    loss = (y * gout).sum() + (state * gstate).sum()
    wanted = [v for v in leaves if v is not None]
    return y.detach(), state.detach(), torch.autograd.grad(loss, wanted)


# -- the running max ----------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_running_max_equals_reference(seed, with_state, ties):
    x = torch.randn(2, 9, 3, 5, dtype=torch.float64)
    state = torch.randn(2, 3, 5, dtype=torch.float64) if with_state else None
    if ties:
        x = torch.randint(0, 3, x.shape).double()
        state = torch.randint(0, 3, state.shape).double() if with_state else None
    gy = torch.randn_like(x)
    gs = torch.randn(2, 3, 5, dtype=torch.float64)

    def fast(x, s):
        m = trm.triton_running_max(x, s, dim=1)
        return m, m[:, -1]

    def ref(x, s):
        m = running_max_ref(x, s, dim=1)
        return m, m[:, -1]

    m, s, grads = _grads(fast, [x, state], gy, gs)
    m_ref, s_ref, grads_ref = _grads(ref, [x, state], gy, gs)
    assert torch.equal(m, m_ref) and torch.equal(s, s_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if with_state:
        assert grads[1].abs().sum() > 0


def test_running_max_other_dims_and_float32(seed):
    x = torch.randn(3, 4, 10)
    state = torch.randn(3, 4)
    assert torch.equal(trm.triton_running_max(x, state, dim=-1), running_max_ref(x, state, dim=-1))


# -- the gen4 / openash mixers ------------------------------------------------------


def _mix_inputs(kind, b=2, t=11, h=2, dh=4, dtype=torch.float64, ties=False):
    streams = torch.randn(b, t, 4, h, dh, dtype=dtype)
    state = torch.randn(b, h, dh, dtype=dtype)
    if ties:
        streams[:, :, 2] = torch.randint(0, 3, (b, t, h, dh)).to(dtype)
        state = torch.randint(0, 3, (b, h, dh)).to(dtype)
    alpha = 0.5 + 0.3 * torch.randn(3, dtype=dtype)
    weight = torch.randn(h, 5 * h, dtype=dtype) / 4 if kind == "openash" else None
    return streams, state, alpha, weight


@pytest.mark.parametrize("kind", ["gen4", "openash"])
@pytest.mark.parametrize("ties", [False, True])
def test_mix_equals_reference(seed, kind, ties):
    streams, state, alpha, weight = _mix_inputs(kind, ties=ties)
    gy = torch.randn(2, 11, 2, 4, dtype=torch.float64)
    gs = torch.randn(2, 2, 4, dtype=torch.float64)
    inputs = [streams, state, alpha, weight]
    y, s, grads = _grads(lambda *a: tmix.triton_mix(kind, *a), inputs, gy, gs)
    y_ref, s_ref, grads_ref = _grads(lambda *a: mix_ref(kind, *a), inputs, gy, gs)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["streams", "state", "alpha", "weight"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
    assert grads[1].abs().sum() > 0


def test_mix_float32_without_state(seed):
    streams, _, alpha, weight = _mix_inputs("openash", dtype=torch.float32)
    y, s = tmix.triton_mix("openash", streams, None, alpha, weight)
    y_ref, s_ref = mix_ref("openash", streams, None, alpha, weight)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gen4", "openash"])
def test_mix_chunked_and_one_token_steps_equal_full(seed, kind):
    rng = random.Random(seed)
    streams, state, alpha, weight = _mix_inputs(kind, t=12)
    with torch.no_grad():
        full, full_state = tmix.triton_mix(kind, streams, state, alpha, weight)
        for lengths in (random_chunks(12, rng, max_cuts=4), [1] * 12):
            outs, s, t = [], state, 0
            for n in lengths:
                y, s = tmix.triton_mix(kind, streams[:, t : t + n], s, alpha, weight)
                outs.append(y)
                t += n
            assert torch.equal(s, full_state)
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-13, atol=1e-13)
            if kind == "gen4":  # purely elementwise: bit-identical whatever the chunks
                assert torch.equal(torch.cat(outs, 1), full)


@pytest.mark.parametrize("kind", ["gen4", "openash"])
def test_mix_gradients_chunked_equal_full(seed, kind):
    streams, state, alpha, weight = _mix_inputs(kind, t=10)
    gy = torch.randn(2, 10, 2, 4, dtype=torch.float64)
    gs = torch.randn(2, 2, 4, dtype=torch.float64)

    def chunked(streams, state, alpha, weight):
        y1, s = tmix.triton_mix(kind, streams[:, :4], state, alpha, weight)
        y2, s = tmix.triton_mix(kind, streams[:, 4:], s, alpha, weight)
        return torch.cat([y1, y2], 1), s

    inputs = [streams, state, alpha, weight]
    _, _, grads = _grads(lambda *a: tmix.triton_mix(kind, *a), inputs, gy, gs)
    _, _, grads_chunked = _grads(chunked, inputs, gy, gs)
    for a, b in zip(grads, grads_chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- the switch and the whole model -------------------------------------------------


def test_auto_picks_fused_on_cpu_and_triton_is_explicit():
    x = torch.zeros(1)
    assert resolve_kernel("auto", x) == "fused"
    assert resolve_kernel("triton", x) == "triton"  # allowed here: the interpreter is on
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            resolve_kernel("triton", x)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_triton_equals_fused(seed, mixer):
    config = SamOutConfig.from_preset("tiny", mixer=mixer, vocab_size=64, hidden_size=16, num_heads=2,
                                      num_layers=2, kernel="fused")
    model = SamOut(config).double()
    ids = torch.randint(0, 64, (2, 9))
    results = {}
    for kernel in ("fused", "triton"):
        model.set_kernel(kernel)
        model.zero_grad()
        logits, state = model(ids[:, :5])
        logits2, state = model(ids[:, 5:], state)
        loss = logits.square().mean() + logits2.square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[kernel] = (torch.cat([logits, logits2], 1).detach(), state, grads)
    (lf, sf, gf), (lt, st, gt) = results["fused"], results["triton"]
    torch.testing.assert_close(lt, lf, rtol=1e-10, atol=1e-10)
    for a, b in zip(sf, st):
        torch.testing.assert_close(a["running_max"], b["running_max"], rtol=1e-12, atol=1e-12)
    assert len(gf) == len(gt)
    for a, b in zip(gf, gt):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
