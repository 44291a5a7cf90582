"""MaxStateSuper token mixers: every variant of docs/architecture.md, "Mixers".

Each mixer works in two stages, so that tests can feed the same projected streams to
the full, chunked and one-step forms and demand bit-identical results:

    streams = mixer.project(x)                  # [B, T, k, H, dh], one fused Linear
    y, new_state = mixer.mix(streams, state)    # y: [B, T, H, dh]; state: [B, H, dh]

`forward(x, state)` chains the two and merges the heads back to [B, T, D]. The only
thing carried across time is the running max of one stream (`state`); all the rest
is per position, so any chunking gives the same outputs.

Kernels compute `mix` (`config.kernel`, or `SamOut.set_kernel`; see samout/ops/kernels.py):
gen3, gen4 and openash call `samout.ops.maxstate_mix`, dual and conv `samout.ops.running_max`
with their eager combine; each op picks its backend from the setting.
- "fused": the fused mix (one autograd function: blocked running max, polynomial with
  an explicit backward), or the blocked running max.
- "triton": the Triton kernels for gen4, openash and the running max; gen3 the fused path.
- "auto" (default): "triton" on CUDA tensors when triton imports, else "fused".
- "reference": the plain eager code (`torch.cummax` + autograd through `combine`).
All give the same outputs, states and gradients (to float rounding; tests compare them).

With `config.max_decay` the running max forgets (m_t = max(x_t, m_{t-1} - δ)), with a
learnable δ = softplus(θ) per head-channel of the max stream (`decay_theta`, a 1-D
parameter, so AdamW's weight decay leaves it alone). Without it, no parameter is made and
the code is exactly the old one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samout.config import KERNELS, MIXERS, SamOutConfig
from samout.ops.doubling_max import cummax_values
from samout.ops.maxstate_mix import gen3_ref, gen4_ref, maxstate_mix, mix_step, openash_ref
from samout.ops.recompute import project_and_mix_recomputed
from samout.ops.running_max import running_max, running_max_cummax


class MaxStateSuper(nn.Module):
    """Base class: fused projection into `num_streams` streams, running max of one."""

    num_streams: int
    max_stream: int  # index of the stream whose running max carries the context
    num_alphas: int = 0
    fused: str | None = None  # this mixer's kind in samout.ops.maxstate_mix, if it is one

    def __init__(self, config: SamOutConfig) -> None:
        super().__init__()
        self.kernel = config.kernel
        self.recompute = config.recompute  # see samout/ops/recompute.py
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.proj = nn.Linear(config.hidden_size, self.num_streams * config.hidden_size, bias=False)
        # Learnable scalars of the polynomial, all initialised to 0.5 as in the seeds.
        self.alpha = nn.Parameter(torch.full((self.num_alphas,), 0.5)) if self.num_alphas else None
        if config.max_decay:
            # softplus(θ0) = max_decay_init: θ0 = log(exp(δ0) - 1).
            theta0 = math.log(math.expm1(config.max_decay_init))
            self.decay_theta = nn.Parameter(torch.full((config.hidden_size,), theta0))
        else:
            self.decay_theta = None

    def decay(self) -> Tensor | None:
        """δ = softplus(θ) as [H, dh], or None without max_decay."""
        if self.decay_theta is None:
            return None
        return F.softplus(self.decay_theta).view(self.num_heads, self.head_dim)

    def project(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return self.proj(x).view(b, t, self.num_streams, self.num_heads, self.head_dim)

    def mix(self, streams: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.fused is not None:
            return maxstate_mix(self.fused, streams, state, self.alpha, self.fused_weight(), self.decay(),
                                kernel=self.kernel)
        m = running_max(streams[:, :, self.max_stream], state, dim=1, decay=self.decay(), kernel=self.kernel)
        return self.combine(streams, m), m[:, -1]

    def mix_reference(self, streams: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The plain eager form: `torch.cummax`, then autograd through `combine`."""
        m = running_max_cummax(streams[:, :, self.max_stream], state, dim=1, decay=self.decay())
        return self.combine(streams, m), m[:, -1]

    def set_kernel(self, kernel: str) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel = kernel

    def fused_weight(self) -> Tensor | None:
        """The head-mixing weight `maxstate_mix` takes (openash), or None."""
        return None

    def combine(self, streams: Tensor, m: Tensor) -> Tensor:
        """The polynomial: streams [B, T, k, H, dh] and running max m [B, T, H, dh]."""
        raise NotImplementedError

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token per row, for decoding (no autograd): x [B, D] -> (y [B, D], state
        [B, H, dh]); the same function as `forward(x[:, None], state)`. Mixers with a
        polynomial override it with fewer operations (see `step_gen4`)."""
        y, new_state = self.forward(x[:, None], state)
        return y[:, 0], new_state

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        if self.recompute and torch.is_grad_enabled():
            y, new_state = project_and_mix_recomputed(self, x, state)
        else:
            y, new_state = self.mix(self.project(x), state)
        return y.reshape(b, t, d), new_state


class Gen3Mixer(MaxStateSuper):
    """Seed 001: a, b, c = W3 x; m = cummax_t(c);
    y = α1 b + α2 m + α3 a + α4 c + (a + b + c) ⊙ m + α5 m."""

    num_streams, max_stream, num_alphas, fused = 3, 2, 5, "gen3"

    def combine(self, streams: Tensor, m: Tensor) -> Tensor:
        return gen3_ref(self.alpha, streams, m)


class DualMixer(MaxStateSuper):
    """Seed 002: a, b, c = W3 x; m = cummax_t(a); s = running max of m over heads
    (in index order, at the same time step, so causal); y = (s + b) ⊙ c + b."""

    num_streams, max_stream = 3, 0

    def combine(self, streams: Tensor, m: Tensor) -> Tensor:
        _, b, c = streams.unbind(2)
        s = cummax_values(m, dim=2)  # over the head axis
        return (s + b) * c + b


def step_gen4(mixer: MaxStateSuper, x: Tensor, state: Tensor | None,
              head_mix: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """gen4 (and openash with `head_mix`) for one token per row, written for few operations:
    decoding a small batch costs per operation, not per number (the 85M model at batch 1
    spends about as long in its ~30 small operations per layer as in reading its int8
    weights): `samout.ops.maxstate_mix.mix_step`; tests compare it with `forward`."""
    n = x.shape[0]
    streams = mixer.proj(x).view(n, 4, mixer.num_heads, mixer.head_dim)
    y, e = mix_step(streams, state, mixer.alpha, head_mix, mixer.decay())
    return y.view(n, -1), e


class Gen4Mixer(MaxStateSuper):
    """Seed 003: a, b, c, d = W4 x; e = cummax_t(c);
    y = a⊙b + α1 b + α2 d + a⊙(α3 e + d) + b⊙(c + e) + c⊙e."""

    num_streams, max_stream, num_alphas, fused = 4, 2, 3, "gen4"

    def combine(self, streams: Tensor, m: Tensor) -> Tensor:
        return gen4_ref(self.alpha, streams, m)

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return step_gen4(self, x, state)


class OpenAshMixer(MaxStateSuper):
    """The seed author's published model: gen4 + G ⊙ e, where G = Linear(5H, H) mixes
    the five streams [a, b, c, d, e] across the head axis (per time step and channel)."""

    num_streams, max_stream, num_alphas, fused = 4, 2, 3, "openash"

    def __init__(self, config: SamOutConfig) -> None:
        super().__init__(config)
        self.head_mix = nn.Linear(5 * config.num_heads, config.num_heads, bias=False)

    def combine(self, streams: Tensor, m: Tensor) -> Tensor:
        return openash_ref(self.alpha, self.head_mix.weight, streams, m)

    def fused_weight(self) -> Tensor:
        return self.head_mix.weight

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return step_gen4(self, x, state, self.head_mix.weight)


class ConvMixer(MaxStateSuper):
    """Seed 000: p0..p4 = W5 x; e = cummax_t(p2); the six streams [p0..p4, e] stacked as
    6*dh channels and fused by Conv2d(6dh, dh, kernel (1, 5), padding (0, 2)) sliding over
    the *head* axis (layout [B, 6dh, T, H]). Over heads the padding is harmless; over time
    it would let position t see t+1 and t+2."""

    num_streams, max_stream = 5, 2

    def __init__(self, config: SamOutConfig) -> None:
        super().__init__(config)
        dh = config.head_dim
        self.conv_fusion = nn.Conv2d(6 * dh, dh, kernel_size=(1, 5), padding=(0, 2))

    def combine(self, streams: Tensor, m: Tensor) -> Tensor:
        six = torch.cat([streams, m.unsqueeze(2)], dim=2)  # [B, T, 6, H, dh]
        b, t, _, h, dh = six.shape
        six = six.permute(0, 2, 4, 1, 3).reshape(b, 6 * dh, t, h)  # channel = stream*dh + c
        return self.conv_fusion(six).permute(0, 2, 3, 1)  # [B, dh, T, H] -> [B, T, H, dh]


MIXER_CLASSES: dict[str, type[MaxStateSuper]] = {
    "gen3": Gen3Mixer,
    "dual": DualMixer,
    "gen4": Gen4Mixer,
    "openash": OpenAshMixer,
    "conv": ConvMixer,
}
# One mixer class per name a config accepts (samout.config.MIXERS), in the same order.
if tuple(MIXER_CLASSES) != MIXERS:
    raise ImportError(f"samout.layers.mixers.MIXER_CLASSES {tuple(MIXER_CLASSES)} does not match "
                      f"samout.config.MIXERS {MIXERS}")


def build_mixer(config: SamOutConfig) -> MaxStateSuper:
    return MIXER_CLASSES[config.mixer](config)
