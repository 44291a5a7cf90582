"""MaxStateSuper mixing: the running max of one stream, then a polynomial of all streams.

    y, new_state = maxstate_mix(kind, streams, state, alpha, weight, decay, kernel="fused")

kind is "gen3", "gen4" or "openash" (docs/architecture.md, "Mixers"); streams
[B, T, k, H, dh] come from the mixer's fused projection; y is [B, T, H, dh] and the state
[B, H, dh]. One function, several backends with the same results (`reference` defines
them; tests/ops/test_maxstate_mix.py and tests/ops/test_triton.py compare them):

- `reference`: `mix_ref`, the eager polynomials over `torch.cummax` (the "reference"
  kernel, and what graphs capture);
- `fused`: one autograd function with an explicit backward (the "fused" kernel);
- `triton`: Triton kernels for gen4 and openash without a forgetting max (the "triton"
  kernel; the rest takes the fused path);
- `step`: one token per row for decoding, in few operations (gen4 and openash).
"""

from __future__ import annotations

from torch import Tensor

from samout.ops.kernels import resolve_kernel
from samout.ops.maxstate_mix.fused import fused_mix
from samout.ops.maxstate_mix.reference import TRITON_KINDS, gen3_ref, gen4_ref, mix_ref, openash_ref
from samout.ops.maxstate_mix.step import mix_step


def maxstate_mix(kind: str, streams: Tensor, state: Tensor | None, alpha: Tensor,
                 weight: Tensor | None = None, decay: Tensor | None = None, *,
                 kernel: str = "fused") -> tuple[Tensor, Tensor]:
    """(y, new state) of mixer `kind` on `streams` from `state`, computed by `kernel` (a
    `SamOutConfig.kernel` setting: "auto", "fused", "reference" or "triton")."""
    kernel = resolve_kernel(kernel, streams)
    if kernel == "reference":
        return mix_ref(kind, streams, state, alpha, weight, decay)
    if kernel == "triton" and decay is None and kind in TRITON_KINDS:
        # Imported here: triton is optional, and tests set TRITON_INTERPRET before the import.
        from samout.ops.maxstate_mix.triton import triton_mix

        return triton_mix(kind, streams, state, alpha, weight)
    return fused_mix(kind, streams, state, alpha, weight, decay)


__all__ = ["fused_mix", "gen3_ref", "gen4_ref", "maxstate_mix", "mix_ref", "mix_step", "openash_ref"]
