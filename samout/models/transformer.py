"""The softmax baseline (docs/architecture.md, "The Transformer baseline (seed 004)"):
a standard decoder-only Transformer with the same call signature and state contract as
SamOut, so every tool that runs SamOut (training, generation, benchmarks) runs it unchanged.

    x = Embedding(ids) (+ sinusoidal position)          # or rotary inside attention
    pre-norm (default):  x = x + Attn(N(x));  x = x + FFN(N(x));  final N
    post-norm:           x = N(x + Attn(x));  x = N(x + FFN(x))
    N    = LayerNorm (seed 004) or RMSNorm (modern)
    Attn = causal softmax attention via F.scaled_dot_product_attention
    FFN  = Linear(D, F) -> ReLU -> Linear(F, D)                     (seed 004)
           Linear(F, D)(silu(x W_gate) * x W_up)                     (SwiGLU, modern)
    logits = Linear(D, V, bias=False)(x)
    (the `modern` style: rotary, RMSNorm, SwiGLU and no biases; transformer_config.py)

Its state is the KV cache: layers[i] = {"key": [B, H, T, dh], "value": [B, H, T, dh]},
keys stored after rotary rotation. A call with a state appends to it. Outside autograd
the cache is preallocated and written in place (samout/layers/kv_cache.py: `append_kv`),
so a decode step copies one token's keys, not the whole cache; the state is still a
plain functional value. `Transformer.set_kv_cache("concat")` restores the old
concatenation per call (as Hugging Face's default dynamic cache does): the reference the
tests compare with.

Rows with caches of different lengths run in one call (the serving engine's batched
decode) through `cache_lengths`: the caches are LEFT-padded to a common T, row b holding
its cache_lengths[b] real entries in the last positions; a key padding mask hides the
padding from attention and each row's new tokens take positions cache_lengths[b] + i.
Without `cache_lengths` the call is the plain one above, unchanged.
Initialisation is PyTorch's default, the same as SamOut's, so neither side gets a
tuned init the other lacks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samout.layers.kv_cache import append_kv, check_kv_cache
from samout.models.base import PretrainedModelMixin
from samout.models.samout import check_input_ids, check_logits_to_keep
from samout.models.transformer_config import TransformerConfig, match_transformer_to
from samout.state import State, StateBatch, check_state_layers


def sinusoidal_positions(start: int | Tensor, length: int, dim: int, device=None, dtype=None) -> Tensor:
    """[length, dim] table for positions start..start+length-1 (Vaswani et al.), computed
    on the fly: pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(same).
    With `start` a tensor [B] of per-row starts: [B, length, dim]."""
    pos = _positions(start, length, device)[..., None]
    inv = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    angles = pos * inv
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return pe.to(dtype or torch.get_default_dtype())


def rotary_angles(start: int | Tensor, length: int, head_dim: int, theta: float,
                  device=None, scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [length, head_dim] for the rotate-half form of RoPE; with `start`
    a tensor [B] of per-row starts: [B, 1, length, head_dim] (broadcast over heads).
    `scaling`: a config's rope_scaling (transformer_config.py), or None."""
    pos = _positions(start, length, device)
    inv, attention_factor = rotary_frequencies(head_dim, theta, scaling, device)
    angles = pos[..., None] * inv
    angles = torch.cat((angles, angles), dim=-1)
    if angles.dim() == 3:
        angles = angles[:, None]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotary_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                       device=None) -> tuple[Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] (float64) and the factor cos and sin are
    multiplied by (1 but for YaRN), under `scaling` (see transformer_config.py)."""
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    kind = None if scaling is None else scaling["type"]
    factor = 1.0 if scaling is None else float(scaling["factor"])
    if kind == "ntk":  # NTK-aware: stretch the base so the lowest frequency is interpolated by ~factor
        theta = theta * factor ** (head_dim / (head_dim - 2)) if head_dim > 2 else theta * factor
    inv = theta ** -dims
    if kind == "linear":
        inv = inv / factor
    attention_factor = 1.0
    if kind == "yarn":
        trained = scaling["original_max_position_embeddings"]
        rotations = trained * inv / (2 * math.pi)  # turns each frequency makes over the training length
        beta_fast, beta_slow = 32.0, 1.0
        keep = ((rotations - beta_slow) / (beta_fast - beta_slow)).clamp(0, 1)  # 1: fast, kept as is
        inv = inv / factor * (1 - keep) + inv * keep
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, attention_factor


def _positions(start: int | Tensor, length: int, device) -> Tensor:
    """float64 positions: [length] from an int start, [B, length] from per-row starts [B]."""
    if isinstance(start, Tensor):
        return start.to(device=device, dtype=torch.float64)[:, None] + \
            torch.arange(length, device=device, dtype=torch.float64)
    return torch.arange(start, start + length, device=device, dtype=torch.float64)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, dh] rotated by position (cos, sin [T, dh])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def padded_causal_mask(lengths: Tensor, past: int, t: int) -> Tensor:
    """bool [B, 1, t, past + t], True where query i of row b may attend: the row's real
    cache entries (the last lengths[b] of `past` left-padded slots) and new keys 0..i."""
    keys = torch.arange(past + t, device=lengths.device)
    real = keys >= (past - lengths)[:, None]  # [B, past + t]: padding is the first past - len slots
    causal = keys[None, :] <= past + torch.arange(t, device=lengths.device)[:, None]  # [t, past + t]
    return (real[:, None, :] & causal[None])[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.kv_cache = "preallocated"  # or "concat" (Transformer.set_kv_cache)
        self.limit = config.max_position_embeddings

    def forward(
        self, x: Tensor, cache: dict[str, Tensor] | None, rotary: tuple[Tensor, Tensor] | None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`mask` (bool [B, 1, t, T_cache + t], True = attend): given for left-padded caches
        of different lengths (it hides the padding and is causal within the chunk)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past = 0 if cache is None else cache["key"].shape[2]
        if self.kv_cache == "preallocated" and not (torch.is_grad_enabled() and k.requires_grad):
            k = append_kv(cache["key"] if past else None, k, self.limit)
            v = append_kv(cache["value"] if past else None, v, self.limit)
        elif past:  # the plain concatenation (and under autograd: in-place writes would break it)
            k = torch.cat((cache["key"], k), dim=2)
            v = torch.cat((cache["value"], v), dim=2)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:  # one new token sees the whole cache
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after a cache: query i sees keys 0..past+i (bottom-right causal)
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), {"key": k, "value": v}


class TransformerFeedForward(nn.Module):
    """Two Linear layers with an activation between them (ReLU in seed 004); SwiGLU: fc1
    makes the gate and the up projection in one matrix [2 F, D], fc2 is the down one."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        width = config.ffn_hidden_size
        self.fc1 = nn.Linear(config.hidden_size, 2 * width if self.swiglu else width, bias=config.bias)
        self.fc2 = nn.Linear(width, config.hidden_size, bias=config.bias)
        self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "swiglu": nn.SiLU}[config.activation]()

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, up = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(self.act(gate) * up)
        return self.fc2(self.act(self.fc1(x)))


def make_norm(config: TransformerConfig) -> nn.Module:
    """LayerNorm (with a bias unless config.bias is false) or RMSNorm, over the width."""
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=1e-6)
    return nn.LayerNorm(config.hidden_size, bias=config.bias)


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = make_norm(config)
        self.ffn = TransformerFeedForward(config)

    def forward(self, x: Tensor, cache, rotary,
                mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if self.pre_norm:
            h, cache = self.attn(self.attn_norm(x), cache, rotary, mask)
            x = x + h
            return x + self.ffn(self.ffn_norm(x)), cache
        h, cache = self.attn(x, cache, rotary, mask)
        x = self.attn_norm(x + h)
        return self.ffn_norm(x + self.ffn(x)), cache


class PaddedKVBatch(StateBatch):
    """KV caches of any lengths in one batch: left-padded to the longest, the model called
    with each row's real length (`cache_lengths`), each row's state a view without padding."""

    def __init__(self, states: list[State]) -> None:
        self.state, lengths = left_pad_caches(states)
        self.lengths: list[int] = lengths.tolist()

    @staticmethod
    def key(state: State) -> None:
        return None  # every cache pads to the longest

    def model_kwargs(self) -> dict[str, Tensor]:
        return {"cache_lengths": torch.tensor(self.lengths)}

    def advance(self, state: State, new_tokens: int) -> None:
        self.state, self.lengths = state, [n + new_tokens for n in self.lengths]

    def rows(self) -> list[State]:
        return [cache_row(self.state, i, n) for i, n in enumerate(self.lengths)]


class Transformer(PretrainedModelMixin, nn.Module):
    """`logits, state = model(input_ids, state=None)`, exactly like `SamOut`.

    input_ids: LongTensor [B, T] with ids in [0, vocab_size).
    logits:    [B, T, vocab_size].
    state:     `State` (the KV cache), layers[i] = {"key", "value": [B, H, T_seen, dh]};
               pass it back to continue; chunked calls equal one call to float rounding.
    """

    config_class = TransformerConfig
    state_batch = PaddedKVBatch

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.padding_idx)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.norm = make_norm(config) if config.norm == "pre" else None
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor, state: State | None = None, *,
                cache_lengths: Tensor | None = None, logits_to_keep: int = 0,
                targets: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, State]:
        """`cache_lengths` (LongTensor [B], optional): the state's caches are left-padded and
        row b holds cache_lengths[b] real entries (the last ones); the returned state is
        left-padded the same way, with cache_lengths + T_new real entries per row.
        `logits_to_keep` and `targets`: as in SamOut.forward."""
        check_input_ids(input_ids, self.config.vocab_size)
        check_logits_to_keep(logits_to_keep)
        b, t = input_ids.shape
        caches = self._check_state(state, b)
        past = 0 if caches[0] is None else caches[0]["key"].shape[2]
        start: int | Tensor = past
        mask = None
        if cache_lengths is not None:
            start = self._check_cache_lengths(cache_lengths, b, past)
            mask = padded_causal_mask(start, past, t)
        longest = past if cache_lengths is None else int(start.max()) if b else 0
        limit = self.config.max_position_embeddings
        if longest + t > limit:
            raise ValueError(
                f"context of {longest + t} tokens ({longest} cached + {t} new) exceeds "
                f"max_position_embeddings={limit}: start a new state, or use a model "
                f"configured with a larger max_position_embeddings"
            )
        x = self.embed(input_ids)
        rotary = None
        if self.config.positional == "sinusoidal":
            x = x + sinusoidal_positions(start, t, self.config.hidden_size, x.device, x.dtype)
        else:
            rotary = rotary_angles(start, t, self.config.head_dim, self.config.rope_theta, x.device,
                                   self.config.rope_scaling)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cache, rotary, mask)
            new_caches.append(cache)
        if logits_to_keep:
            if targets is not None:
                raise ValueError("give logits_to_keep or targets, not both")
            x = x[:, -logits_to_keep:]
        if self.norm is not None:
            x = self.norm(x)
        return self.head_output(x, targets, ignore_index), State(new_caches)

    def set_kv_cache(self, kind: str) -> None:
        """"preallocated" (default: KV buffers written in place, grown by a quarter) or
        "concat" (a new tensor per call by concatenation, the reference)."""
        check_kv_cache(kind)
        for layer in self.layers:
            layer.attn.kv_cache = kind

    def set_rope_scaling(self, scaling: dict | None) -> None:
        """Evaluate beyond the training length with RoPE scaling, e.g. {"type": "ntk",
        "factor": 4.0} at 4x (see transformer_config.py); None turns it off. Checked like
        the config field it sets; caches made before the change hold keys rotated the old
        way, so start a new state."""
        from samout.models.transformer_config import check_rope_scaling

        check_rope_scaling(scaling, self.config.positional)
        self.config.rope_scaling = None if scaling is None else dict(scaling)

    def _check_state(self, state: State | None, batch_size: int) -> list[dict[str, Tensor] | None]:
        check_state_layers(state, len(self.layers))
        if state is None:
            return [None] * len(self.layers)
        h, dh = self.config.num_heads, self.config.head_dim
        seen = None
        for i, layer in enumerate(state):
            for name in ("key", "value"):
                t = layer.get(name)
                ok = t is not None and t.dim() == 4 and tuple(t.shape[:2]) == (batch_size, h)
                if not ok or t.shape[3] != dh or (seen is not None and t.shape[2] != seen):
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(
                        f"state layer {i}: {name} must have shape ({batch_size}, {h}, T, {dh}) with the "
                        f"same T in every layer, got {got} (is this a Transformer KV cache?)"
                    )
                seen = t.shape[2]
        return list(state.layers)

    def _check_cache_lengths(self, lengths: Tensor, batch_size: int, past: int) -> Tensor:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch_size \
                or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"cache_lengths must be an integer tensor of shape ({batch_size},)")
        if batch_size and (int(lengths.min()) < 0 or int(lengths.max()) > past):
            raise ValueError(f"cache_lengths must lie in [0, {past}] (the padded cache length), "
                             f"got {lengths.tolist()}")
        return lengths.to(device=self.embed.weight.device, dtype=torch.long)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """An explicit empty KV cache (T = 0)."""
        p = self.embed.weight  # the head may be a low-precision module (samout.quant)
        shape = (batch_size, self.config.num_heads, 0, self.config.head_dim)
        empty = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return State([{"key": empty.clone(), "value": empty.clone()} for _ in self.layers])


def left_pad_caches(states: list[State]) -> tuple[State, Tensor]:
    """One batched KV cache from per-sequence caches (batch 1 each, any lengths): each
    left-padded with zeros to the longest; returns it with the lengths, for `cache_lengths`."""
    lengths = [s[0]["key"].shape[2] for s in states]
    longest = max(lengths)

    def pad(t: Tensor, n: int) -> Tensor:
        if n == longest:
            return t
        return torch.cat((t.new_zeros(*t.shape[:2], longest - n, t.shape[3]), t), dim=2)

    layers = [{k: torch.cat([pad(s[i][k], n) for s, n in zip(states, lengths)]) for k in states[0][i]}
              for i in range(len(states[0]))]
    return State(layers), torch.tensor(lengths, dtype=torch.long)


def cache_row(state: State, row: int, length: int) -> State:
    """Row `row` of a left-padded batched KV cache without its padding (a view, batch 1)."""
    return State([{k: v[row:row + 1, :, v.shape[2] - length:] for k, v in layer.items()} for layer in state])


__all__ = ["PaddedKVBatch", "Transformer", "TransformerConfig", "append_kv", "cache_row", "left_pad_caches",
           "match_transformer_to"]
