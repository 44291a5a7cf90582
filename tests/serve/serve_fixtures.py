"""Tiny served models and an in-process server on a free 127.0.0.1 port, for tests/serve."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from samout import SamOut, Transformer, match_transformer_to
from samout.chat.template import DEFAULT_CHAT_TEMPLATE
from samout.serve.api_server import ServerSettings, build_app
from samout.serve.loading import served_model
from samout.tokenizer import TOKENIZER_NAME, update_tokenizer_config
from tests.chat.chat_fixtures import make_chat_run


def spread(model: torch.nn.Module, factor: float = 3.0) -> torch.nn.Module:
    """Random tiny models give nearly flat next-token scores; larger weights make greedy
    choices decisive, so token-for-token comparisons test something."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    return model.eval()


def make_models(directory: Path) -> tuple[SamOut, Transformer, object]:
    """A tiny SamOut (saved as a chat run in `directory`) and its matched Transformer."""
    model, tokenizer = make_chat_run(directory, seed=0)
    spread(model)
    model.save_pretrained(directory)
    torch.manual_seed(1)
    transformer = spread(Transformer(match_transformer_to(model.config, max_position_embeddings=512)))
    return model, transformer, tokenizer


def save_transformer_run(directory: Path, transformer: Transformer, tokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(directory)
    (directory / TOKENIZER_NAME).write_text(tokenizer.to_str())
    update_tokenizer_config(directory, chat_template=DEFAULT_CHAT_TEMPLATE)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models, settings: ServerSettings | None = None):
    """Serve `models` (ServedModel list) with uvicorn in a thread; yields the base URL."""
    settings = settings or ServerSettings()
    app = build_app(models, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=5, **settings.uvicorn_options()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def serve_pair(samout_model, transformer, tokenizer, **options):
    """ServedModels "samout" and "transformer" (both with the chat template)."""
    template = DEFAULT_CHAT_TEMPLATE
    return [served_model(samout_model, tokenizer, "samout", chat_template=template, **options),
            served_model(transformer, tokenizer, "transformer", chat_template=template, **options)]
