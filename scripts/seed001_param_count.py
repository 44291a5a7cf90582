"""What seed 001's printed parameter count (2,763,532) really counts (docs/benchmarks.md,
"Seed 001's 2,763,532 parameters").

Rebuilds the *shapes* of seed 001's printed model (its `__init__`s as printed: three
scalar alphas per mixer, since alpha2/alpha3 are commented out there, plus the layer's
residual alpha) and applies the article's counting loop, which skips 0-dimensional
parameters; then applies the same loop to samout's `seed-001` preset.

    python scripts/seed001_param_count.py
"""

from __future__ import annotations

import torch
from torch import nn

from samout import SamOut, SamOutConfig


def seed_count(model: nn.Module) -> int:
    """The article's loop: every parameter whose shape is not torch.Size([])."""
    return sum(p.numel() for p in model.parameters() if p.shape != torch.Size([]))


def seed001_model(vocab: int, hidden: int, heads: int, layers: int) -> nn.Module:
    """Seed 001's module tree as printed, parameters only (no forward needed to count)."""

    def scalar() -> nn.Parameter:
        return nn.Parameter(torch.tensor(0.5))

    def layer() -> nn.Module:
        mixer = nn.Module()
        mixer.combined = nn.Linear(hidden, 3 * hidden, bias=False)
        mixer.alpha1, mixer.alpha4, mixer.alpha5 = scalar(), scalar(), scalar()
        ffn = nn.Module()
        ffn.ffn1, ffn.ffn2, ffn.gate = (nn.Linear(hidden, hidden) for _ in range(3))
        block = nn.Module()
        block.self_attention, block.ffn, block.layer_norm = mixer, ffn, nn.LayerNorm(hidden)
        block.alpha = scalar()
        return block

    model = nn.Module()
    model.em = nn.Embedding(vocab, hidden, padding_idx=259)
    model.decoder_layers = nn.ModuleList(layer() for _ in range(layers))
    model.head = nn.Linear(hidden, vocab, bias=False)
    assert hidden % heads == 0
    return model


def main() -> None:
    vocab, layers = 8192 + 268, 8  # the article's hyperparameters
    hidden, heads = 2**6 * layers, layers
    seed = seed001_model(vocab, hidden, heads, layers)
    formula = 2 * vocab * hidden + layers * (6 * hidden**2 + 5 * hidden)
    print(f"seed 001's model, seed 001's loop: {seed_count(seed):,} "
          f"(2VD + L(6D^2 + 5D) = {formula:,}; all parameters {sum(p.numel() for p in seed.parameters()):,})")
    ours = SamOut(SamOutConfig.from_preset("seed-001"))
    print(f"samout seed-001, seed 001's loop: {seed_count(ours):,} "
          f"(all parameters {ours.num_parameters():,})")
    print("the article prints: 2,763,532")


if __name__ == "__main__":
    main()
