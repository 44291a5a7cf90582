"""Kernels, each with a plain reference beside it (`*_ref`)."""

from samout.ops.running_max import running_max, running_max_cummax, running_max_ref

__all__ = ["running_max", "running_max_cummax", "running_max_ref"]
