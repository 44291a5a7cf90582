"""The SamOut language model (docs/architecture.md, "Layer and model").
One source of truth: every wrapper (Hugging Face, ONNX export, training, generation) imports this class.

    x = Embedding(ids)                                  # no positional encoding
    for layer: x = layer(x) + x                         # the seeds' outer residual
    layer(x) = LayerNorm(α ⊙ FFN(mixer(x)) + (1 − α) ⊙ x)
    logits = Linear(D, V, bias=False)(x)

Hybrid models (`config.layer_types` / `attention_every`) swap the mixer of some layers
for causal softmax attention (samout/layers/attention.py); everything around it stays.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samout.config import SamOutConfig
from samout.layers.attention import STATE_KEYS, CausalAttention
from samout.layers.kv_cache import check_kv_cache
from samout.layers.mixers import build_mixer
from samout.models.base import PretrainedModelMixin
from samout.ops.blend_norm import blend_norm
from samout.ops.gated_ffn import gated_ffn
from samout.ops.kernels import resolve_kernel
from samout.ops.tracing import is_tracing
from samout.state import State, StateBatch, check_state_layers


class FeedForward(nn.Module):
    """ffn2(ffn1(x) ⊙ ReLU(gate(x))), as in the seeds (width multiplier optional)."""

    def __init__(self, hidden_size: int, mult: int = 1, lean: bool = False) -> None:
        super().__init__()
        inner = hidden_size * mult
        self.ffn1 = nn.Linear(hidden_size, inner)
        self.gate = nn.Linear(hidden_size, inner)
        self.ffn2 = nn.Linear(inner, hidden_size)
        self.lean = lean  # config.recompute: the leaner autograd function (samout/ops/gated_ffn.py)
        self.in_proj: nn.Module | None = None  # ffn1 and gate side by side (samout.quant, decoding)
        self.in_dtype: torch.dtype | None = None  # in_proj to ffn2 in this dtype (samout.quant)

    def forward(self, x: Tensor) -> Tensor:
        if self.in_proj is not None:
            a, g = self.in_proj(x if self.in_dtype is None else x.to(self.in_dtype)).chunk(2, dim=-1)
            return self.ffn2(a * torch.relu(g)).to(x.dtype)
        if self.lean and torch.is_grad_enabled() and all(type(m) is nn.Linear for m in self.children()):
            return gated_ffn(x, self.ffn1.weight, self.ffn1.bias, self.gate.weight, self.gate.bias,
                             self.ffn2.weight, self.ffn2.bias)
        return self.ffn2(self.ffn1(x) * torch.relu(self.gate(x)))


class DecoderLayer(nn.Module):
    """One layer; `kind` "maxstate" (the config's mixer) or "attention". Its state is a
    dict: {"running_max": [B, H, dh]} or {"key", "value": [B, H, T_kept, dh]}."""

    def __init__(self, config: SamOutConfig, kind: str = "maxstate") -> None:
        super().__init__()
        self.kind = kind
        self.mixer = CausalAttention(config) if kind == "attention" else build_mixer(config)
        self.ffn = FeedForward(config.hidden_size, config.ffn_mult, lean=config.recompute)
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.lean = config.recompute  # the leaner blend + norm (samout/ops/blend_norm.py)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if self.kind == "attention":
            h, new_state = self.mixer(x, state)
        else:
            h, running = self.mixer(x, None if state is None else state["running_max"])
            new_state = {"running_max": running}
        if self.lean and torch.is_grad_enabled():
            ln = self.layer_norm
            return blend_norm(self.ffn(h), x, self.alpha, ln.weight, ln.bias, ln.eps), new_state
        return self.layer_norm(self.alpha * self.ffn(h) + (1 - self.alpha) * x), new_state

    def step(self, x: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`forward` for one token per row (x [B, D]) in fewer operations, for decoding."""
        if self.kind == "attention":
            h, new_state = self.mixer(x[:, None], state)
            h = h[:, 0]
        else:
            h, running = self.mixer.step(x, None if state is None else state["running_max"])
            new_state = {"running_max": running}
        # Under autocast the FFN's output is bfloat16 while x stays float32 (as in `forward`,
        # whose blend promotes): lerp needs one dtype.
        return self.layer_norm(torch.lerp(x, self.ffn(h).to(x.dtype), self.alpha)), new_state


class SamOut(PretrainedModelMixin, nn.Module):
    """`logits, state = model(input_ids, state=None)`.

    input_ids: LongTensor [B, T] with ids in [0, vocab_size).
    logits:    [B, T, vocab_size].
    state:     `State` with layers[i] = {"running_max": [B, H, dh]} (maxstate layers) or
               {"key", "value": [B, H, T_kept, dh]} (attention layers); pass it back to
               continue exactly where this call stopped, any chunk length included.
    """

    config_class = SamOutConfig
    state_batch = StateBatch  # fixed-size states (and attention layers of equal lengths) stack

    def __init__(self, config: SamOutConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config, kind) for kind in config.resolved_layer_types)
        self.norm = nn.LayerNorm(config.hidden_size) if config.final_norm else None
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight

    # -- forward -------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: State | None = None, *, logits_to_keep: int = 0,
                targets: Tensor | None = None, ignore_index: int = -100,
                output_hidden: bool = False) -> tuple[Tensor, State]:
        """`logits_to_keep` n > 0: logits of the last n positions only (the name and meaning
        of Hugging Face's argument). A prefill needs only the last position's; the output head
        is then not run over the whole prompt, which at a small width is half its FLOPs.
        `targets` [B, T]: return the mean cross-entropy against them (a scalar) in place of
        the logits, computed without materialising them (`head_output`); for training.
        `output_hidden`: the final hidden states [B, T, D] (after the final norm) in place of the
        logits, for a caller that applies the head itself (TRL's fused log-probability head)."""
        check_input_ids(input_ids, self.config.vocab_size)
        check_logits_to_keep(logits_to_keep)
        layer_states = self._check_state(state, input_ids.shape[0])
        new_states = []
        if self._steps(input_ids):
            x = self.embed(input_ids[:, 0])
            for layer, s in zip(self.layers, layer_states):
                h, s = layer.step(x, s)
                x = h + x
                new_states.append(s)
            x = x[:, None]
        else:
            x = self.embed(input_ids)
            for layer, s in zip(self.layers, layer_states):
                h, s = layer(x, s)
                x = h + x
                new_states.append(s)
        if logits_to_keep:
            if targets is not None:
                raise ValueError("give logits_to_keep or targets, not both")
            x = x[:, -logits_to_keep:]
        if self.norm is not None:
            x = self.norm(x)
        if output_hidden:
            return x, State(new_states)
        return self.head_output(x, targets, ignore_index), State(new_states)

    def _steps(self, input_ids: Tensor) -> bool:
        """Decoding one token (no autograd, no tracing) takes the lean `DecoderLayer.step`
        path; the "reference" and "triton" kernels keep the plain one."""
        if input_ids.shape[1] != 1 or torch.is_grad_enabled():
            return False
        if is_tracing():
            return False
        return resolve_kernel(self.config.kernel, self.embed.weight) == "fused"

    def _check_state(self, state: State | None, batch_size: int) -> list[dict[str, Tensor] | None]:
        check_state_layers(state, len(self.layers))
        if state is None:
            return [None] * len(self.layers)
        h, dh = self.config.num_heads, self.config.head_dim
        out = []
        for i, (layer, entry) in enumerate(zip(self.layers, state)):
            if layer.kind == "attention":
                _check_kv(i, entry, batch_size, h, dh, layer.mixer.window)
                out.append(None if entry["key"].shape[2] == 0 else entry)
                continue
            want = (batch_size, h, dh)
            t = entry.get("running_max")
            if t is None or tuple(t.shape) != want:
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"state layer {i}: running_max must have shape {want}, got {got}")
            out.append(entry)
        return out

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """An explicit empty state (running max = -inf; no keys or values), for graphs
        that need tensors."""
        p = self.embed.weight  # stays float32 under samout.quant (the head may be int8)
        device, dtype = device or p.device, dtype or p.dtype
        shape = (batch_size, self.config.num_heads, self.config.head_dim)
        layers = []
        for layer in self.layers:
            if layer.kind == "attention":
                layers.append(layer.mixer.empty_state(batch_size, device, dtype))
            else:
                layers.append({"running_max": torch.full(shape, float("-inf"), device=device, dtype=dtype)})
        return State(layers)

    def set_kernel(self, kernel: str) -> SamOut:
        """Switch every mixer between "auto", the "fused" or "triton" kernels and the eager
        "reference" (same results; see samout/ops/kernels.py). Returns the model."""
        for layer in self.layers:
            layer.mixer.set_kernel(kernel)
        self.config.kernel = kernel
        return self

    def set_kv_cache(self, kind: str) -> SamOut:
        """The attention layers' KV cache (hybrids): "preallocated" (default: written in
        place, samout/layers/kv_cache.py) or "concat" (a new tensor per call, the
        reference). No effect on maxstate layers. Returns the model."""
        check_kv_cache(kind)
        for layer in self.layers:
            if layer.kind == "attention":
                layer.mixer.set_kv_cache(kind)
        return self


def _check_kv(i: int, entry: dict[str, Tensor], batch_size: int, h: int, dh: int, window: int | None) -> None:
    """An attention layer's state: key and value [B, H, T, dh], the same T, at most W - 1."""
    k, v = (entry.get(name) for name in STATE_KEYS)
    ok = k is not None and v is not None and k.dim() == 4 and k.shape == v.shape
    ok = ok and tuple(k.shape[:2]) == (batch_size, h) and k.shape[3] == dh
    if ok and window is not None and k.shape[2] > window - 1:
        raise ValueError(f"state layer {i}: an attention window of {window} keeps at most {window - 1} "
                         f"keys, got {k.shape[2]}")
    if not ok:
        got = {name: None if entry.get(name) is None else tuple(entry[name].shape) for name in STATE_KEYS}
        raise ValueError(f"state layer {i} (attention): key and value must have shape ({batch_size}, {h}, "
                         f"T, {dh}), got {got}")


def check_logits_to_keep(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got {n!r}")


def check_input_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Clear errors for the wrong type, rank or an id outside [0, vocab_size)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.long, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape [batch, time], got {tuple(input_ids.shape)}"
            + (" (add a batch dimension with ids.unsqueeze(0))" if input_ids.dim() == 1 else "")
        )
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if is_tracing():
        return  # a captured graph (jit.trace, torch.compile, ONNX export) cannot branch on values
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"token id {bad} is out of range for vocab_size {vocab_size} "
            f"(ids must be in [0, {vocab_size}))"
        )
