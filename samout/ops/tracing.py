"""The one "are we capturing a graph" check every op and model path asks.

Fast paths unroll Python loops over time, keep state in autograd functions or call C and
Triton kernels; a captured graph (torch.jit.trace, torch.compile / torch.export, an ONNX
export) needs the plain eager form instead, which has none of these.
"""

from __future__ import annotations

import torch


def is_tracing(*, onnx: bool = True) -> bool:
    """Whether a graph is being captured: torch.jit.trace, torch.compile / torch.export, or an
    ONNX export.

    onnx=False leaves out `torch.onnx.is_in_onnx_export`, the one slow check (it imports on
    every call): both ONNX exporters trace (jit) or compile (torch.export), which the other
    two checks report, so a per-token hot path may skip it.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    return onnx and torch.onnx.is_in_onnx_export()
