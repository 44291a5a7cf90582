"""The doubling scan (the cumulative max of exported graphs) against torch.cummax."""

import importlib

import pytest
import torch

from samout.ops.doubling_max import cummax_values, doubling_max, export_length_bound

doubling_module = importlib.import_module("samout.ops.doubling_max")  # the module, not the function


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 9, 31, 32, 33, 100])
def test_doubling_max_equals_cummax_exactly(length, seed):
    # Few distinct values, so ties are everywhere; some -inf, as in an empty state.
    x = torch.randint(-3, 4, (2, length, 3, 5)).float()
    x[x == -3] = float("-inf")
    for dim in range(4):
        assert torch.equal(doubling_max(x, dim), torch.cummax(x, dim).values)
    y = torch.randn(3, length, 4, 6)
    assert torch.equal(doubling_max(y, 1, max_len=128), torch.cummax(y, 1).values)
    assert torch.equal(doubling_max(y, -3), torch.cummax(y, 1).values)


def test_doubling_max_refuses_a_length_over_its_bound(seed):
    with pytest.raises(ValueError, match="exceeds max_len"):
        doubling_max(torch.randn(1, 9), 1, max_len=8)


def test_cummax_values_uses_the_doubling_scan_only_while_exporting(monkeypatch, seed):
    calls = []

    def spy(x, dim, max_len=None):
        calls.append(max_len)
        return doubling_max(x, dim, max_len)

    monkeypatch.setattr(doubling_module, "doubling_max", spy)
    x = torch.randn(2, 20, 3)
    assert torch.equal(cummax_values(x, 1), torch.cummax(x, 1).values) and calls == []
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with export_length_bound(64):
        assert torch.equal(cummax_values(x, 1), torch.cummax(x, 1).values)
    assert calls == [64]
    assert torch.equal(cummax_values(x, 1), torch.cummax(x, 1).values) and calls == [64, None]
