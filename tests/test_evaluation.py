"""Evaluation: loss, bits per byte over exactly the bytes evaluated, loss by position."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from samout.data.dataset import TokenData
from samout.evaluation import evaluate
from samout.generation import load_for_generation
from samout.tokenizer import token_byte_lengths


def test_full_validation_matches_a_direct_computation(trained_run, prepared_data):
    model, tokenizer = load_for_generation(trained_run)
    data = TokenData(prepared_data)
    lengths = token_byte_lengths(tokenizer)
    result = evaluate(model, data, lengths, seq_len=64, batch_size=5)
    val = np.asarray(data.val).astype(np.int64)
    # Every token but the first is a target once; its bytes are the split's bytes minus the first token's.
    assert result.tokens == len(val) - 1
    assert result.bytes == data.meta["splits"]["val"]["bytes"] - lengths[val[0]]
    # Direct: the same windows one by one.
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(val) - 1, 64):
            chunk = torch.from_numpy(val[s:s + 65])[None]
            logits, _ = model(chunk[:, :-1])
            nats += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    assert math.isclose(result.loss, nats / result.tokens, rel_tol=1e-6)
    assert math.isclose(result.bits_per_byte, nats / (math.log(2) * result.bytes), rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(result.loss), rel_tol=1e-9)
    assert len(result.loss_by_position) == 64 and all(x > 0 for x in result.loss_by_position)


def test_subset_of_windows(trained_run, prepared_data):
    model, tokenizer = load_for_generation(trained_run)
    lengths = token_byte_lengths(tokenizer)
    result = evaluate(model, TokenData(prepared_data), lengths, seq_len=32, max_windows=3)
    assert result.tokens == 3 * 32
