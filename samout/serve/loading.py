"""A run directory -> a `ServedModel`: the model loaded once, its engine (with its state
cache and the store behind it the flags name), its tokenizer and, when the run has a chat
template, the renderer of chat messages to prompt ids."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from samout.chat.template import DEFAULT_CHAT_TEMPLATE, end_of_turn_ids, render_ids
from samout.errors import SamoutError
from samout.files import TOKENIZER_CONFIG_NAME
from samout.models.transformer import Transformer
from samout.quant import DEFAULT_INFERENCE_DTYPE
from samout.run_dir import load
from samout.serve.api_server import ServedModel
from samout.serve.disk_state_store import DiskStateStore, private_directory
from samout.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Engine
from samout.serve.redis_state_store import RedisStateStore, check_redis_url, redacted
from samout.serve.state_cache import StateCache
from samout.serve.state_format import model_fingerprint
from samout.serve.state_store import StateStore, TieredStateCache
from samout.tokenizer import end_ids, has_chat_tokens, read_tokenizer_config

DEFAULT_STATE_CACHE_MB = 256
DEFAULT_STATE_CACHE_DIR_MB = 1024


def chat_renderer(tokenizer, template: str | None):
    """(render, stop ids) for a tokenizer and a chat template; (None, empty) without chat.
    Replies stop at the end of text or at what the template closes an assistant turn with."""
    if template is None or (template == DEFAULT_CHAT_TEMPLATE and not has_chat_tokens(tokenizer)):
        return None, frozenset()

    def render(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return render_ids(tokenizer, messages, add_generation_prompt=True, template=template, tools=tools)

    return render, end_ids(tokenizer) | {end_of_turn_ids(tokenizer, template)[0]}


def open_state_cache(model: torch.nn.Module, budget_bytes: int, *, directory: str | Path | None = None,
                     directory_bytes: int = 0, url: str | None = None,
                     ttl_seconds: int | None = None) -> StateCache | TieredStateCache | None:
    """The state cache of one served model: the memory LRU alone (None when its budget is 0
    and no store is named), or with a disk (`directory`) or Redis (`url`) tier behind it.
    Stores are keyed by the model's fingerprint. A Redis that cannot be reached at start-up is
    a SamoutError (a misconfiguration is found at once; one that fails later is logged)."""
    if directory is not None and url is not None:
        raise SamoutError("give --state-cache-dir or --state-store, not both")
    if directory is None and url is None:
        return StateCache(budget_bytes) if budget_bytes > 0 else None
    if url is not None:
        check_redis_url(url)
    fingerprint = model_fingerprint(model)
    device = next(model.parameters()).device
    if directory is not None:
        store: StateStore = DiskStateStore(private_directory(directory) / fingerprint, directory_bytes)
    else:
        store = RedisStateStore(url, f"samout:state:{fingerprint}:", ttl_seconds)
        try:
            store.ping()
        except Exception as err:
            store.close()
            raise SamoutError(f"cannot reach the state store {redacted(url)}: {type(err).__name__}: {err}") \
                from None
    return TieredStateCache(StateCache(budget_bytes), store, device)


def served_model(model, tokenizer, name: str, *, chat_template: str | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 state_cache_mb: float = DEFAULT_STATE_CACHE_MB, state_cache_dir: str | Path | None = None,
                 state_cache_dir_mb: float = DEFAULT_STATE_CACHE_DIR_MB, state_store: str | None = None,
                 state_store_ttl: int | None = None) -> ServedModel:
    """A model already in memory, behind a fresh (not yet started) engine. `state_cache_dir`
    or `state_store` (a redis:// URL) add a persistent tier behind the memory cache
    (samout.serve.state_store)."""
    for flag, value in (("--state-cache-mb", state_cache_mb), ("--state-cache-dir-mb", state_cache_dir_mb)):
        if value < 0:
            raise SamoutError(f"{flag} must be >= 0, got {value}")
    cache = open_state_cache(model, int(state_cache_mb * 2**20), directory=state_cache_dir,
                             directory_bytes=int(state_cache_dir_mb * 2**20), url=state_store,
                             ttl_seconds=state_store_ttl)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    cache=cache, name=name)
    render, stop_ids = chat_renderer(tokenizer, chat_template)
    limit = model.config.max_position_embeddings if isinstance(model, Transformer) else None
    return ServedModel(name=name, engine=engine, tokenizer=tokenizer, render_chat=render,
                       chat_stop_ids=stop_ids, context_limit=limit,
                       dtype=getattr(model, "inference_dtype", DEFAULT_INFERENCE_DTYPE))


def load_served_model(run_dir: str | Path, name: str | None = None, device: str = "cpu",
                      dtype: str = DEFAULT_INFERENCE_DTYPE, **engine_options) -> ServedModel:
    """`dtype`: the weights for inference (float32, bfloat16, int8; see samout.quant)."""
    run_dir = Path(run_dir)
    model, tokenizer = load(run_dir, device, dtype=dtype)
    template = read_tokenizer_config(run_dir).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise SamoutError(f"{run_dir / TOKENIZER_CONFIG_NAME}: chat_template must be a Jinja string")
    if template == DEFAULT_CHAT_TEMPLATE and not has_chat_tokens(tokenizer):
        print(f"warning: {run_dir} has a chat template but its tokenizer has no chat tokens; "
              "/v1/chat/completions is off for it", file=sys.stderr)
        template = None
    return served_model(model, tokenizer, name or run_dir.resolve().name, chat_template=template,
                        **engine_options)
