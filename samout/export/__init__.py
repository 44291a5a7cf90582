"""Export SamOut models for other runtimes (ONNX; see samout/export/onnx.py)."""
