"""Kernels, each with a plain reference beside it (`*_ref`)."""

from samout.ops.doubling_max import cummax_values, doubling_max, export_length_bound
from samout.ops.running_max import running_max, running_max_cummax, running_max_ref

__all__ = ["cummax_values", "doubling_max", "export_length_bound", "running_max", "running_max_cummax",
           "running_max_ref"]
