"""`samout train --init-from RUN_DIR`: start a new run from another run's model.

The weights, model config and tokenizer come from RUN_DIR; the optimizer, schedule and
step start fresh. The data directory's tokenizer must be RUN_DIR's, or RUN_DIR's with
tokens appended (what `samout prepare --format chat --tokenizer RUN_DIR` makes when it adds
the chat tokens): then the embedding (and an untied output head) grow by those rows, each
new row the mean of the old ones, and every other weight is loaded unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from samout.errors import SamoutError
from samout.files import CONFIG_NAME, TOKENIZER_NAME, CheckpointError
from samout.models import MODEL_CLASSES
from samout.run_dir import load_model
from samout.tokenizer import load_tokenizer


def check_tokenizers(source_dir: Path, data_tokenizer_path: Path) -> None:
    """The data's tokenizer must give every token of the source's tokenizer the same id."""
    source = load_tokenizer(source_dir / TOKENIZER_NAME).get_vocab(with_added_tokens=True)
    data = load_tokenizer(data_tokenizer_path).get_vocab(with_added_tokens=True)
    for token, idx in sorted(source.items(), key=lambda kv: kv[1]):
        if data.get(token) != idx:
            raise SamoutError(
                f"the data's tokenizer ({data_tokenizer_path}) does not match {source_dir}'s: token "
                f"{token!r} has id {idx} there and {data.get(token)} here; prepare the data with "
                f"--tokenizer {source_dir}")


def check_model_settings(config, fields: dict[str, Any], preset: str | None) -> None:
    """Model settings given with --init-from must describe the source model (it is not rebuilt)."""
    fields = dict(fields)
    preset = preset or fields.pop("preset", None)
    fields.pop("preset", None)
    have = config.to_dict()
    asked = dict(fields)
    if preset is not None:
        try:
            preset_fields = type(config).from_preset(preset).to_dict()
        except (ValueError, TypeError) as err:
            raise SamoutError(str(err)) from None
        asked = {**{k: v for k, v in preset_fields.items() if k not in ("vocab_size", "padding_idx",
                                                                          "format_version")}, **asked}
    diff = [f"{k} {have.get(k)!r} (asked {v!r})" for k, v in asked.items() if have.get(k) != v]
    if diff:
        raise SamoutError(f"--init-from takes the model as it is: it has {', '.join(diff)}; "
                          "drop those settings")


def grow_vocab(model: torch.nn.Module, vocab_size: int) -> torch.nn.Module:
    """The same model with `vocab_size` embedding (and head) rows; new rows = mean of the old."""
    old = model.config.vocab_size
    if vocab_size == old:
        return model
    config = dataclasses.replace(model.config, vocab_size=vocab_size)
    grown = type(model)(config)
    tensors = model.state_dict()
    for name in ("embed.weight", "head.weight"):
        if name in tensors:
            t = tensors[name]
            tensors[name] = torch.cat([t, t.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    grown.load_state_dict(tensors)
    return grown


def load_init_model(source: str | Path, data, model_fields: dict[str, Any] | None = None,
                    preset: str | None = None, quiet: bool = True) -> torch.nn.Module:
    """The source run's model, checked against the data directory and grown to its vocabulary."""
    source = Path(source)
    if not (source / CONFIG_NAME).is_file():
        raise SamoutError(f"--init-from {source}: no model there ({CONFIG_NAME} is missing)")
    if not (source / TOKENIZER_NAME).is_file():
        raise SamoutError(f"--init-from {source}: {TOKENIZER_NAME} is missing")
    try:
        model = load_model(source, fallback=False)
    except CheckpointError as err:
        raise SamoutError(f"--init-from {source}: {err}") from None
    if type(model) not in MODEL_CLASSES.values():
        raise SamoutError(f"--init-from {source}: unknown model class")
    check_model_settings(model.config, model_fields or {}, preset)
    check_tokenizers(source, data.tokenizer_path)
    if data.vocab_size < model.config.vocab_size:
        raise SamoutError(f"{data.dir} has vocab {data.vocab_size} but {source}'s model has "
                          f"{model.config.vocab_size}: prepare the data with --tokenizer {source}")
    if data.vocab_size > model.config.vocab_size and not quiet:
        print(f"growing the embedding from {model.config.vocab_size} to {data.vocab_size} tokens "
              "(the data's tokenizer adds tokens, e.g. the chat tokens)")
    return grow_vocab(model, data.vocab_size)
