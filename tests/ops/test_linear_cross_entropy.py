"""The fused head + cross-entropy equals the plain one: loss, and gradients of the hidden
states and the head, over several chunks, with ignored targets and a scaled loss."""

import pytest
import torch

from samout import SamOut, SamOutConfig, Transformer, TransformerConfig
from samout.ops import linear_cross_entropy as lce


@pytest.mark.parametrize("chunk", [37 * 11, 1 << 21])  # several uneven chunks; one chunk
def test_equals_the_plain_loss_and_gradients(seed, monkeypatch, chunk):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", chunk)
    n, d, v = 53, 24, 37
    x = torch.randn(n, d, dtype=torch.float32) * 2
    w = torch.randn(v, d) * 0.5
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.3] = -100
    grads = []
    for fn in (lce.linear_cross_entropy, lce.linear_cross_entropy_ref):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xi, wi, targets)
        (3 * loss).backward()
        grads.append((loss.detach(), xi.grad, wi.grad))
    (l1, gx1, gw1), (l2, gx2, gw2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5, atol=0)
    assert torch.allclose(gx1, gx2, rtol=1e-4, atol=1e-6 * float(gx2.abs().max()))
    assert torch.allclose(gw1, gw2, rtol=1e-4, atol=1e-6 * float(gw2.abs().max()))
    assert float(gx1[targets == -100].abs().max()) == 0  # ignored rows get no gradient


def test_every_target_ignored_gives_nan_like_cross_entropy():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    t = torch.full((4,), -100)
    assert torch.isnan(lce.linear_cross_entropy(x, w, t))
    assert torch.isnan(lce.linear_cross_entropy_ref(x, w, t))


def test_without_gradients_it_is_the_plain_form():
    x, w, t = torch.randn(6, 8), torch.randn(5, 8), torch.randint(0, 5, (6,))
    with torch.no_grad():
        assert torch.equal(lce.linear_cross_entropy(x, w, t), lce.linear_cross_entropy_ref(x, w, t))


def test_bad_shapes_are_a_value_error():
    with pytest.raises(ValueError, match="linear_cross_entropy takes"):
        lce.linear_cross_entropy(torch.randn(2, 3, 8), torch.randn(5, 8), torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("make", [
    lambda: SamOut(SamOutConfig.from_preset("tiny", attention_every=2)),
    lambda: Transformer(TransformerConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4)),
])
def test_model_targets_give_the_loss_and_gradients_of_its_logits(seed, make):
    """`model(ids, targets=t)` is the cross-entropy of `model(ids)`'s logits, gradients included."""
    model = make()
    ids = torch.randint(0, 512, (2, 17))
    targets = torch.randint(0, 512, (2, 17))
    targets[0, :5] = -100
    loss, _ = model(ids, targets=targets)
    loss.backward()
    fused = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(ids)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    plain.backward()
    assert torch.allclose(loss, plain, rtol=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(fused[k], p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-12), k
    with pytest.raises(ValueError, match="targets must be a tensor of shape"):
        model(ids, targets=targets[:, :3])
    with pytest.raises(ValueError, match="logits_to_keep or targets"):
        model(ids, targets=targets, logits_to_keep=1)
