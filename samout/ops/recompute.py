"""Leaner training memory: the mixer's projection recomputed in backward.

The largest tensors a SamOut layer keeps for backward are the k projected streams
[B, T, k, H, dh] (k = 4 for gen4/openash: four times the layer's width per position),
which the mixing kernels need to compute their gradients. With `config.recompute` the
mixer keeps only its input x (which the layer keeps anyway) and the incoming state, and
runs `project` + `mix` again inside backward (`torch.utils.checkpoint`, non-reentrant):
one more projection matrix product and mixing pass per layer and step, for 4D fewer
floats per position and layer. Any kernel ("fused", "triton", "reference") works inside.
Results are those of the plain path (the same ops run again; tests compare gradients).
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.checkpoint import checkpoint


def project_and_mix_recomputed(mixer, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """mixer.mix(mixer.project(x), state), keeping only x and state for backward."""
    return checkpoint(_project_and_mix, mixer, x, state, use_reentrant=False, preserve_rng_state=False)


def _project_and_mix(mixer, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    return mixer.mix(mixer.project(x), state)
