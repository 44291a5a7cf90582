"""`samout bench onnx`: a tiny run trains, exports, quantizes and times the graphs."""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from samout.cli import main  # noqa: E402


@pytest.mark.slow
def test_tiny_onnx_benchmark(capsys):
    assert main(["bench", "onnx", "--steps", "2", "--repeats", "1", "--decode-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# samout bench onnx — ")
    assert "greedy equal" in out and "size decode.onnx: float32" in out
    assert "held-out perplexity" in out and "decode latency per token" in out
