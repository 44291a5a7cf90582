"""The MaxStateSuper mixing op in its plain eager form: the definition every kernel is
tested against.

    y, new_state = mix_ref(kind, streams, state, alpha, weight, decay)

kind is "gen3", "gen4" or "openash" (docs/architecture.md, "Mixers"); streams
[B, T, k, H, dh] come from the mixer's fused projection; the running max is taken over
stream `MAX_STREAM` in all three. The polynomials are written here once; the fused,
Triton and one-token forms restate them only in the shape their kernels need
(tests/ops/test_maxstate_mix.py and tests/ops/test_triton.py compare each with these).
"""

from __future__ import annotations

import torch
from torch import Tensor

from samout.ops.running_max.reference import running_max_cummax

KINDS = ("gen3", "gen4", "openash")
TRITON_KINDS = ("gen4", "openash")  # the kinds with a Triton kernel (triton.py); gen3 runs fused
MAX_STREAM = 2  # the stream whose running max carries the context, in gen3/gen4/openash


def gen3_ref(alpha: Tensor, streams: Tensor, m: Tensor) -> Tensor:
    a, b, c = streams.unbind(2)
    al = alpha
    return al[0] * b + al[1] * m + al[2] * a + al[3] * c + (a + b + c) * m + al[4] * m


def gen4_ref(alpha: Tensor, streams: Tensor, m: Tensor) -> Tensor:
    a, b, c, d = streams.unbind(2)
    al = alpha
    return a * b + al[0] * b + al[1] * d + a * (al[2] * m + d) + b * (c + m) + c * m


def openash_ref(alpha: Tensor, weight: Tensor, streams: Tensor, m: Tensor) -> Tensor:
    five = torch.cat([streams, m.unsqueeze(2)], dim=2)  # [B, T, 5, H, dh]
    b_, t, _, h, dh = five.shape
    # Streams and heads form the 5H inputs of G; channels ride along as a batch axis.
    g = torch.nn.functional.linear(five.reshape(b_, t, 5 * h, dh).transpose(-1, -2), weight)
    return gen4_ref(alpha, streams[:, :, :4], m) + g.transpose(-1, -2) * m


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown fused mixer kind {kind!r}: choose gen3, gen4 or openash")


def check_state(streams: Tensor, state: Tensor | None) -> None:
    """A mixer state is [B, H, dh] for streams [B, T, k, H, dh] (or None: no past)."""
    want = streams.shape[:1] + streams.shape[3:]
    if state is not None and state.shape != want:
        raise ValueError(f"mixer state must have shape {tuple(want)}, got {tuple(state.shape)}")


def mix_ref(
    kind: str, streams: Tensor, state: Tensor | None, alpha: Tensor, weight: Tensor | None = None,
    decay: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The eager reference: `torch.cummax` running max, then the polynomial."""
    check_kind(kind)
    m = running_max_cummax(streams[:, :, MAX_STREAM], state, dim=1, decay=decay)
    if kind == "gen3":
        y = gen3_ref(alpha, streams, m)
    elif kind == "gen4":
        y = gen4_ref(alpha, streams, m)
    else:
        y = openash_ref(alpha, weight, streams, m)
    return y, m[:, -1]
