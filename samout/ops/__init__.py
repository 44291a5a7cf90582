"""Kernels, one package per op with a plain reference beside every fast path (`reference.py`).

Each op's package exposes one function that picks the backend (see samout/ops/kernels.py):
`samout.ops.running_max.running_max` and `samout.ops.maxstate_mix.maxstate_mix`.
"""

from samout.ops.doubling_max import cummax_values, doubling_max, export_length_bound
from samout.ops.running_max import running_max, running_max_cummax, running_max_ref

__all__ = ["cummax_values", "doubling_max", "export_length_bound", "running_max", "running_max_cummax",
           "running_max_ref"]
