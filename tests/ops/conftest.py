import importlib

import pytest

blocked = importlib.import_module("samout.ops.running_max.blocked")


@pytest.fixture(autouse=True, params=["blocked", "small"])
def scan_path(request, monkeypatch):
    """Run every test through both running-max paths: the blocked scan (large inputs)
    and the cummax form used for small inputs (the tests' inputs are all small)."""
    monkeypatch.setattr(blocked, "SMALL_SCAN", -1 if request.param == "blocked" else 1 << 40)
    return request.param
