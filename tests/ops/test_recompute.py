"""Leaner training memory (config.recompute): the recomputed projection, the gated FFN
and the blend + norm give the gradients of the plain path, to float rounding."""

import pytest
import torch

from samout import SamOut, SamOutConfig
from samout.config import MIXERS
from samout.ops.blend_norm import blend_norm, blend_norm_ref
from samout.ops.gated_ffn import gated_ffn, gated_ffn_ref


def _grads(model, ids):
    model.zero_grad()
    logits, state = model(ids[:, :6])
    logits2, state = model(ids[:, 6:], state)
    loss = logits.square().mean() + logits2.sin().mean() + sum(s["running_max"].sum() for s in state)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixer", MIXERS)
def test_recompute_gives_the_same_gradients(seed, mixer):
    config = SamOutConfig.from_preset("tiny", mixer=mixer, vocab_size=80, hidden_size=24, num_heads=3)
    plain = SamOut(config).double()
    lean = SamOut(SamOutConfig.from_dict({**config.to_dict(), "recompute": True})).double()
    lean.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 80, (2, 11))
    loss, grads = _grads(plain, ids)
    loss_lean, grads_lean = _grads(lean, ids)
    torch.testing.assert_close(loss_lean, loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_lean.keys()
    for name in grads:
        torch.testing.assert_close(grads_lean[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kernel,max_decay", [("fused", True), ("reference", False), ("reference", True)])
def test_recompute_gives_the_same_gradients_on_each_path(seed, monkeypatch, kernel, max_decay):
    # "fused" takes the one-function path (_ProjectMix), the others torch.utils.checkpoint.
    from samout.ops import recompute

    config = SamOutConfig.from_preset("tiny", mixer="openash", vocab_size=80, hidden_size=24, num_heads=3,
                                      kernel=kernel, max_decay=max_decay)
    plain = SamOut(config).double()
    lean = SamOut(SamOutConfig.from_dict({**config.to_dict(), "recompute": True})).double()
    lean.load_state_dict(plain.state_dict())
    calls = {"one": 0, "checkpoint": 0}
    real_apply, real_checkpoint = recompute._ProjectMix.apply, recompute.checkpoint
    monkeypatch.setattr(recompute._ProjectMix, "apply",
                        lambda *a: calls.__setitem__("one", calls["one"] + 1) or real_apply(*a))
    monkeypatch.setattr(recompute, "checkpoint",
                        lambda *a, **k: calls.__setitem__("checkpoint", calls["checkpoint"] + 1)
                        or real_checkpoint(*a, **k))
    ids = torch.randint(0, 80, (2, 11))
    loss, grads = _grads(plain, ids)
    loss_lean, grads_lean = _grads(lean, ids)
    assert calls["one" if kernel == "fused" else "checkpoint"] > 0
    assert calls["checkpoint" if kernel == "fused" else "one"] == 0
    torch.testing.assert_close(loss_lean, loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_lean.keys() and any("decay" in n for n in grads) == max_decay
    for name in grads:
        torch.testing.assert_close(grads_lean[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_recompute_keeps_fewer_bytes_for_backward(seed):
    config = SamOutConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_heads=4)
    ids = torch.randint(0, 64, (2, 64))
    kept = {}
    for recompute in (False, True):
        model = SamOut(SamOutConfig.from_dict({**config.to_dict(), "recompute": recompute}))
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = model(ids)
        kept[recompute] = total
    # Per layer and position: 4D streams + the FFN product + the blend are no longer kept.
    assert kept[True] < 0.75 * kept[False]


def test_gated_ffn_equals_reference(seed):
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(s, dtype=torch.float64, requires_grad=True)
          for s in [(12, 8), (12,), (12, 8), (12,), (8, 12), (8,)]]
    gy = torch.randn(2, 5, 8, dtype=torch.float64)
    out = gated_ffn(x, *ws)
    ref = gated_ffn_ref(x, *ws)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad((out * gy).sum(), [x, *ws])
    g_ref = torch.autograd.grad((ref * gy).sum(), [x, *ws])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_blend_norm_equals_reference(seed):
    h, x = (torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 8, dtype=torch.float64)
    out = blend_norm(h, x, alpha, w, b, 1e-5)
    ref = blend_norm_ref(h, x, alpha, w, b, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad((out * gy).sum(), [h, x, alpha, w, b])
    g_ref = torch.autograd.grad((ref * gy).sum(), [h, x, alpha, w, b])
    for a, b_ in zip(g, g_ref):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
