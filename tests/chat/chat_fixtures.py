"""A tiny chat tokenizer (and run directory) shared by the chat tests."""

from __future__ import annotations

from pathlib import Path

import torch

from samout import SamOut, SamOutConfig
from samout.chat.template import DEFAULT_CHAT_TEMPLATE
from samout.tokenizer import TOKENIZER_NAME, train_tokenizer, update_tokenizer_config

TEXT = ["Hello there, how are you? I am fine. What is 2 + 3? It is 5.",
        "The quick brown fox jumps over the lazy dog.", "Sort these words: pear apple fig."] * 20


def chat_tokenizer(vocab_size: int = 300):
    return train_tokenizer(TEXT, vocab_size, chat=True)


def make_chat_run(directory: Path, seed: int = 0, **overrides) -> tuple[SamOut, object]:
    """A run-like directory: random tiny SamOut, chat tokenizer, tokenizer_config.json."""
    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    config = SamOutConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), **overrides)
    model = SamOut(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (directory / TOKENIZER_NAME).write_text(tokenizer.to_str())
    update_tokenizer_config(directory, chat_template=DEFAULT_CHAT_TEMPLATE)
    return model, tokenizer
