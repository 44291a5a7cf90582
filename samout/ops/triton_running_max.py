"""Deprecated: moved to `samout.ops.running_max.triton`; this re-export goes away in the
next release."""

from samout.ops.running_max.triton import triton_running_max  # noqa: F401
