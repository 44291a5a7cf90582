"""A tiny samout run directory for the integration tests (HF, ONNX): a byte-level BPE
`tokenizer.json` trained on a little Shakespeare, and an untrained tiny SamOut."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from samout import SamOut, SamOutConfig
from samout.tokenizer import train_tokenizer

PROMPT = "Shall I compare thee to a summer's day?"


def make_run_dir(directory: Path, text: str, **overrides) -> tuple[SamOut, Tokenizer]:
    """Write config.json, model.safetensors and tokenizer.json into `directory`."""
    tokenizer = train_tokenizer([text[:100_000]], vocab_size=400)
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
