"""Deprecated: moved to `samout.ops.maxstate_mix.triton`; this re-export goes away in the
next release."""

from samout.ops.maxstate_mix.reference import MAX_STREAM, TRITON_KINDS  # noqa: F401
from samout.ops.maxstate_mix.triton import triton_mix  # noqa: F401
