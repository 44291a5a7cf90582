"""Validation loss, perplexity, bits per byte and loss by position in the context.

Bits per byte = total nats / (ln 2 * UTF-8 bytes of the predicted text). The bytes of
each target token come from the tokenizer (exact for byte-level BPE), so the figure
is comparable across tokenizers and exact for any subset of windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from samout.data.dataset import TokenData
from samout.device import resolve_device


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    seq_len: int
    # Mean loss (nats) at each position 0..seq_len-1 of a window.
    loss_by_position: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, token_bytes: np.ndarray, seq_len: int,
             split: str = "val", max_windows: int | None = None, batch_size: int = 8,
             device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
             progress: bool = False) -> EvalResult:
    """Evaluate next-token loss over non-overlapping windows of `split` (all of it by default)."""
    was_training = model.training
    model.eval()
    tokens = data.splits[split]
    windows = data.eval_windows(seq_len, max_windows, split)
    width = max(length for _, length in windows)
    pos_sum = torch.zeros(width, dtype=torch.float64)
    pos_count = torch.zeros(width, dtype=torch.float64)
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    device = resolve_device(device)
    # Windows of equal length batch together; only the last may be shorter.
    bar = tqdm(range(0, len(windows), batch_size), desc=f"eval {split}", disable=None if progress else True)
    for i in bar:
        group = windows[i:i + batch_size]
        for length in sorted({n for _, n in group}):
            rows = np.stack([tokens[s:s + n + 1] for s, n in group if n == length]).astype(np.int64)
            rows = torch.from_numpy(rows).to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").double().cpu()
            total_nats += float(nats.sum())
            total_tokens += y.numel()
            total_bytes += int(token_bytes[y.cpu().numpy()].sum())
            pos_sum[:length] += nats.sum(0)
            pos_count[:length] += nats.shape[0]
    model.train(was_training)
    loss = total_nats / total_tokens
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=total_nats / (math.log(2) * max(1, total_bytes)),
        tokens=total_tokens,
        bytes=total_bytes,
        seq_len=width,
        loss_by_position=(pos_sum / pos_count.clamp(min=1)).tolist(),
    )
