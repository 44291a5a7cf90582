"""`SamOutForCausalLM`: a `transformers` causal LM around `samout.models.samout.SamOut`.

There is no second implementation: the wrapper builds a `SamOut` and registers that
model's own submodules (`embed`, `layers`, `norm`, `head`) as its children, so the
parameter names are samout's (`layers.0.mixer.proj.weight`, ...) and a samout run
directory's `model.safetensors` loads without any key mapping, and a directory written
by `save_pretrained` is a samout checkpoint.

The recurrent state travels as a `SamOutCache`; `generate()` then feeds one token per step
(greedy, sampling and beam search, which reorders the cache). transformers 5.24 renamed the
cache argument and output field from `past_key_values` to `cache`: `forward` takes either
name and returns the field the installed release declares, and the tokens fed to each
step are decided by how many the cache has absorbed, not by how `generate` slices them.

SamOut has no attention mask: every token enters the running max. Left padding is
handled exactly by running each padded prompt on its real tokens only (the state starts
empty, so padding at the left is the same as no padding). With `use_cache=False` (no state
comes back) padding after a row's tokens is accepted too: a causal model's earlier positions
never see it, and its positions' outputs are zeros (what TRL's trainers send: left-padded
prompts, right-padded completions). Padding anywhere else is refused.

`base_model` is a backbone view (`SamOutBackbone`) whose call returns the final hidden states
(`last_hidden_state`): TRL's fused log-probability head runs it and applies the head itself.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from samout.files import MODEL_FILES, verify_checksums
from samout.hf.cache import SamOutCache
from samout.hf.configuration_samout import SamOutHFConfig
from samout.layers.mixers import MaxStateSuper
from samout.models.samout import DecoderLayer, SamOut
from samout.state import State


class SamOutPreTrainedModel(PreTrainedModel):
    config_class = SamOutHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    # A running max cannot roll back tokens (assisted generation needs that).
    _is_stateful = True
    # Activation checkpointing wraps each DecoderLayer's forward (TRL's trainers turn it on
    # by default); decoding's one-token `step` path is never checkpointed.
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        # SamOut's own initialisation (torch defaults, every alpha 0.5), so a fresh
        # SamOutForCausalLM starts exactly like a fresh SamOut. `init` skips loaded tensors.
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d)):
            module.reset_parameters()
        elif isinstance(module, DecoderLayer):
            init.constant_(module.alpha, 0.5)
        elif isinstance(module, MaxStateSuper):
            if module.alpha is not None:
                init.constant_(module.alpha, 0.5)
            if module.decay_theta is not None:
                init.constant_(module.decay_theta, math.log(math.expm1(self.config.max_decay_init)))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A samout run directory carries checksums.json: a truncated or mixed set of model
        # files is named here (as `samout generate` does) instead of loading wrong weights.
        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir():
            verify_checksums(path, names=MODEL_FILES)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        for i, layer in enumerate(self.layers):
            layer.__dict__.pop("forward", None)
            if enable and i % every_n_layers == 0:
                # An instance attribute shadows DecoderLayer.forward; nn.Module.__call__ runs it.
                layer.forward = functools.partial(_checkpointed, gradient_checkpointing_func,
                                                  type(layer).forward.__get__(layer))
        self.gradient_checkpointing = enable

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a KV cache: forward() creates a SamOutCache itself.
        return False


class SamOutForCausalLM(SamOutPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config: SamOutHFConfig) -> None:
        super().__init__(config)
        core = SamOut(config.to_samout_config())
        # Share the submodules, so that parameter names match samout's checkpoints; the
        # core itself is kept out of the module tree (it would add a name prefix).
        self.embed, self.layers, self.norm, self.head = core.embed, core.layers, core.norm, core.head
        self.__dict__["samout"] = core
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        # auto_map and the thin remote-code modules (replacing any copy of samout's sources
        # transformers made for a class loaded as remote code).
        from samout.remote_code import write_hf_files

        write_hf_files(save_directory)

    # -- embeddings (kept in step with the core) -----------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = self.samout.embed = value
        self.samout.config.vocab_size = self.config.vocab_size = value.num_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = self.samout.head = value

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        # A samout run directory has no generation_config.json and its config.json no
        # token ids, so transformers would generate without an end-of-text token.
        super().adjust_generation_fn(*args, **kwargs)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation_config, name) is None:
                setattr(self.generation_config, name, getattr(self.config, name))

    # -- generate() ----------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: Tensor, *args, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        given = [kwargs.get(name) for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
        cache = next((inputs[name] for name in CACHE_ARGUMENTS if inputs.get(name) is not None), None)
        if given and cache is None:
            raise RuntimeError(
                "transformers' prepare_inputs_for_generation dropped the SamOut state (this "
                "transformers release passes the cache in a way samout does not know)"
            )
        if isinstance(cache, SamOutCache) and inputs.get("input_ids") is not None:
            # The state has absorbed exactly `seen_tokens` tokens: feed the rest, whatever
            # slice generate() chose (a wrong slice would silently skip or repeat tokens).
            seen = cache.seen_tokens
            if seen >= input_ids.shape[1]:
                raise RuntimeError(
                    f"the SamOut state has absorbed {seen} tokens of a {input_ids.shape[1]}-token "
                    "sequence: nothing is left to feed"
                )
            inputs["input_ids"] = input_ids[:, seen:].contiguous()
        return inputs

    # -- forward -------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        cache: SamOutCache | None = None,
        past_key_values: SamOutCache | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        position_ids: Tensor | None = None,  # accepted and unused: SamOut has no positions
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("SamOutForCausalLM takes input_ids (inputs_embeds are not supported)")
        if output_attentions or output_hidden_states:
            raise ValueError("SamOut has no attentions, and hidden states are not returned")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the SamOut state as `cache` or as `past_key_values`, not both")
        stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
        if stray:
            raise ValueError(
                f"got a cache as `{stray[0]}`, which SamOut does not read: pass it as `cache` "
                "(or `past_key_values`)"
            )
        given = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = as_samout_cache(given) if (use_cache or given is not None) else None

        keep = 0 if labels is not None else logits_to_keep  # the loss needs every position
        logits, state = self._run(input_ids, None if cache is None else cache.state, attention_mask, keep,
                                  trailing_padding=not use_cache and given is None)
        if cache is not None:
            cache.update_state(state, input_ids.shape[1])

        loss = None
        if labels is not None:
            # Standard causal LM loss: position t predicts token t+1; -100 is ignored.
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        output = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        **{OUTPUT_CACHE_FIELD: cache if use_cache else None})
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    @property
    def base_model(self) -> SamOutBackbone:
        return SamOutBackbone(self)

    def _run(self, input_ids: Tensor, state: State | None, attention_mask: Tensor | None,
             logits_to_keep: int = 0, trailing_padding: bool = False,
             output_hidden: bool = False) -> tuple[Tensor, State | None]:
        # generate() passes the mask of the whole sequence; this call covers its last tokens.
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[-1]:]
        if mask is None or bool(mask.all()):
            return self.samout(input_ids, state, logits_to_keep=logits_to_keep, output_hidden=output_hidden)
        if state is not None:
            raise ValueError(
                "attention_mask has zeros after the first call: SamOut has no attention mask, "
                "only left padding of the prompt is supported"
            )
        spans = padding_spans(mask, trailing_padding)
        width = self.config.hidden_size if output_hidden else self.config.vocab_size
        logits = input_ids.new_zeros((*input_ids.shape, width), dtype=self.head.weight.dtype)
        states = []
        for row, (start, end) in enumerate(spans):
            row_ids = input_ids[row : row + 1, start:end]
            row_logits, row_state = self.samout(row_ids, output_hidden=output_hidden)
            logits[row, start:end] = row_logits[0].to(logits.dtype)
            states.append(row_state)
        if any(end < input_ids.shape[1] for _, end in spans):  # the states hold no padding, but not all
            return logits, None  # end at the last position: none is returned (use_cache=False)
        for i, layer in enumerate(states[0]):
            if len({s[i][k].shape for s in states for k in layer}) > 1:
                raise ValueError(
                    f"layer {i} is attention: prompts of different lengths (left padding) give key/value "
                    "states of different lengths; run them one at a time or with equal lengths"
                )
        return logits, State.stack(states)


def _checkpointed(checkpoint_func, forward, *args, **kwargs):
    """A layer's forward, recomputed in the backward pass when training with autograd."""
    if torch.is_grad_enabled() and forward.__self__.training:
        return checkpoint_func(forward, *args, **kwargs)
    return forward(*args, **kwargs)


# The names a cache can arrive under (transformers < 5.24 used `past_key_values`, later
# releases `cache`), and the output field this release declares.
CACHE_ARGUMENTS = ("cache", "past_key_values")
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SamOutBackbone:
    """`model.base_model`: the model without its head. Called like the model, it returns
    `BaseModelOutputWithPast(last_hidden_state=...)` (what TRL's fused head reads)."""

    _tp_plan = None
    _pp_plan = None

    def __init__(self, model: SamOutForCausalLM) -> None:
        self.model = model

    def __call__(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError("SamOut's backbone takes input_ids")
        hidden, _ = self.model._run(input_ids, None, attention_mask, trailing_padding=not use_cache,
                                    output_hidden=True)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


def padding_spans(mask: Tensor, trailing: bool = False) -> list[tuple[int, int]]:
    """Per row, (first real token, end) of a left-padded mask (0...0 1...1), or with
    `trailing` of a mask padded on both sides (0...0 1...1 0...0)."""
    if not trailing:
        return [(start, mask.shape[1]) for start in left_padding_starts(mask)]
    spans = []
    for row in mask.bool():
        real = row.nonzero().flatten()
        if real.numel() == 0:
            raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
        start, end = int(real[0]), int(real[-1]) + 1
        if not bool(row[start:end].all()):
            raise ValueError("SamOut supports left padding only, and with use_cache=False padding after "
                             "the tokens: attention_mask must be 0...0 1...1 0...0 per row")
        spans.append((start, end))
    return spans


def left_padding_starts(mask: Tensor) -> list[int]:
    """Per row, the index of the first real token of a left-padded mask (0...0 1...1)."""
    mask = mask.bool()
    starts = []
    for row in mask:
        n = int(row.sum())
        if n == 0:
            raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
        if not bool(row[row.numel() - n :].all()):
            raise ValueError(
                "SamOut supports left padding only (attention_mask 0...0 1...1 per row): "
                "set tokenizer.padding_side = 'left'"
            )
        starts.append(row.numel() - n)
    return starts


def as_samout_cache(cache) -> SamOutCache:
    if cache is None:
        return SamOutCache()
    if isinstance(cache, SamOutCache):
        return cache
    raise ValueError(
        f"the cache must be a SamOutCache (SamOut carries a running-max state, not keys and "
        f"values), got {type(cache).__name__}"
    )
