"""A tiny samout run directory for the integration tests (HF, ONNX): a byte-level BPE
`tokenizer.json` trained on a little Shakespeare, and an untrained tiny SamOut."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from samout import SamOut, SamOutConfig

PROMPT = "Shall I compare thee to a summer's day?"


def train_tiny_tokenizer(text: str, vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def make_run_dir(directory: Path, text: str, **overrides) -> tuple[SamOut, Tokenizer]:
    """Write config.json, model.safetensors and tokenizer.json into `directory`."""
    tokenizer = train_tiny_tokenizer(text[:100_000])
    config = SamOutConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), **overrides)
    model = SamOut(config).eval()
    _spread_weights(model)
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return model, tokenizer


def _spread_weights(model: SamOut) -> None:
    # An untrained tiny model's next-token scores are nearly flat; larger random weights
    # make greedy and beam search choices decisive, so comparisons test something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)


def samout_greedy(model: SamOut, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with samout's own state passing, one token per call."""
    logits, state = model(ids)
    out = ids
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
        logits, state = model(nxt, state)
    return out
