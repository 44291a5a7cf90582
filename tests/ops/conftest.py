import importlib

import pytest

# The module, not the function of the same name that samout.ops exports.
rm = importlib.import_module("samout.ops.running_max")


@pytest.fixture(autouse=True, params=["blocked", "small"])
def scan_path(request, monkeypatch):
    """Run every test through both running-max paths: the blocked scan (large inputs)
    and the cummax form used for small inputs (the tests' inputs are all small)."""
    monkeypatch.setattr(rm, "SMALL_SCAN", -1 if request.param == "blocked" else 1 << 40)
    return request.param
