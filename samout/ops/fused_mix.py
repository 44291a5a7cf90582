"""Deprecated: moved to `samout.ops.maxstate_mix` (its `fused` and `reference` modules);
this re-export goes away in the next release."""

from samout.ops.maxstate_mix.fused import POLYNOMIALS as KERNELS  # noqa: F401  (renamed POLYNOMIALS)
from samout.ops.maxstate_mix.fused import fused_mix, mix_backward  # noqa: F401
from samout.ops.maxstate_mix.reference import MAX_STREAM, gen3_ref, gen4_ref, mix_ref, openash_ref  # noqa: F401
