"""Which kernel computes a mixer: the `kernel` switch of SamOutConfig, resolved per call.

    "auto"      (default) "triton" on CUDA tensors when triton imports, else "fused"
    "fused"     the fused PyTorch autograd kernels (`fused.py` of samout/ops/maxstate_mix,
                `blocked.py` of samout/ops/running_max), any device
    "reference" the plain eager code they are all tested against (`reference.py` of each op)
    "triton"    the Triton kernels (`triton.py` of each op): CUDA tensors, or CPU tensors
                under TRITON_INTERPRET=1 (how CI tests them)

Each op's package (`samout.ops.running_max`, `samout.ops.maxstate_mix`) resolves the
setting here, in its one public function.

The Triton modules are imported on first use only, so CPU installs never need triton and
tests can set TRITON_INTERPRET=1 before that import.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

from samout.ops.tracing import is_tracing


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_kernel(kernel: str, tensor: Tensor) -> str:
    """The concrete kernel ("fused", "reference" or "triton") for a call on `tensor`."""
    if kernel == "auto":
        if tensor.is_cuda and triton_available() and not is_tracing():
            return "triton"
        return "fused"
    if kernel == "triton":
        if is_tracing():
            return "fused"  # graphs (ONNX, torch.compile) take the traceable path, as fused does
        if not triton_available():
            raise RuntimeError("kernel 'triton' needs the triton package: pip install 'samout[gpu]'")
        if not tensor.is_cuda and not triton_interpreting():
            raise RuntimeError("kernel 'triton' runs on CUDA tensors (or on CPU under "
                               "TRITON_INTERPRET=1, for tests); use kernel 'auto' or 'fused' on CPU")
    return kernel
