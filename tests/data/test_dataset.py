"""Batches are a pure function of (seed, step, micro-step); ranks slice the global batch;
errors on bad data dirs."""

import pytest
import torch

from samout.data.dataset import TokenData
from samout.errors import SamoutError


def test_batches_are_deterministic_and_shifted(prepared_data):
    data = TokenData(prepared_data)
    x1, y1 = data.train_batch(step=5, micro_step=0, batch_size=4, seq_len=16, seed=1)
    x2, y2 = data.train_batch(step=5, micro_step=0, batch_size=4, seq_len=16, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and x1.dtype == torch.long
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    for other in (dict(step=6), dict(micro_step=1), dict(seed=2), dict(rank=1, world_size=2)):
        args = dict(step=5, micro_step=0, batch_size=4, seq_len=16, seed=1) | other
        assert not torch.equal(data.train_batch(**args)[0], x1)


def test_ranks_slice_the_global_batch(prepared_data):
    """Two ranks with batch 3 read exactly the rows one process with batch 6 reads."""
    data = TokenData(prepared_data)
    args = dict(step=7, micro_step=1, seq_len=16, seed=3)
    whole_x, whole_y = data.train_batch(batch_size=6, **args)
    parts = [data.train_batch(batch_size=3, rank=r, world_size=2, **args) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)
    assert not torch.equal(parts[0][0], parts[1][0])
    with pytest.raises(ValueError, match="outside the world size"):
        data.train_batch(batch_size=3, rank=2, world_size=2, **args)


def test_eval_windows_cover_every_target_once(prepared_data):
    data = TokenData(prepared_data)
    windows = data.eval_windows(64)
    covered = sum(length for _, length in windows)
    assert covered == len(data.val) - 1
    assert all(s2 == s1 + n1 for (s1, n1), (s2, _) in zip(windows, windows[1:]))
    assert len(data.eval_windows(64, max_windows=3)) == 3


def test_not_a_data_dir(tmp_path):
    with pytest.raises(SamoutError, match="not a data directory made by `samout prepare`"):
        TokenData(tmp_path)


def test_seq_len_longer_than_data(prepared_data):
    data = TokenData(prepared_data)
    with pytest.raises(SamoutError, match="longer than the train data"):
        data.check_seq_len(len(data.train))
