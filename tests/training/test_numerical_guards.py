"""A step with a non-finite loss or gradient is skipped (weights and optimizer state
untouched, a warning, a log record); too many in a row stop training with a clear error."""

import copy
import json

import pytest
import torch

from samout.config import SamOutConfig
from samout.data.dataset import TokenData
from samout.models.samout import SamOut
from samout.training.config import TrainConfig
from samout.training.trainer import NonFiniteError, Trainer
from tests.fixtures_pipeline import TINY_TRAIN


def make_trainer(prepared_data, run_dir, seed, **settings):
    data = TokenData(prepared_data)
    torch.manual_seed(seed)
    model = SamOut(SamOutConfig.from_preset("tiny", vocab_size=data.vocab_size))
    cfg = TrainConfig.from_dict(dict(TINY_TRAIN, device="cpu", eval_every=1000, save_every=1000, **settings))
    trainer = Trainer(model, data, cfg, run_dir, quiet=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    return trainer


def poison(trainer, bad_steps, where):
    """Make the forward of the chosen steps (1-based) produce NaN in the loss or only in the
    gradient (a hook on one weight: the loss stays finite)."""
    model = trainer.raw_model
    forward = model.forward

    def patched(*args, **kwargs):
        logits, state = forward(*args, **kwargs)
        if trainer.step + 1 in bad_steps:
            if where == "loss":
                logits = logits * float("nan")
            else:
                logits.register_hook(lambda g: g * float("inf"))
        return logits, state

    model.forward = patched


def snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.raw_model.state_dict().items()},
            copy.deepcopy(trainer.optimizer.state_dict()))


def states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_step_is_skipped(tmp_path, prepared_data, seed, where, capsys):
    trainer = make_trainer(prepared_data, tmp_path / "run", seed, max_steps=6, max_bad_steps=3)
    poison(trainer, {3, 5}, where)
    for step in range(1, 7):
        before = snapshot(trainer)
        loss = trainer.train_step()
        after = snapshot(trainer)
        if step in (3, 5):
            assert states_equal(before[0], after[0]), f"weights changed at skipped step {step}"
            assert states_equal(before[1]["state"], after[1]["state"]), f"optimizer changed at step {step}"
            assert trainer.bad_steps == 1
        else:
            assert torch.isfinite(torch.tensor(loss))
            assert not states_equal(before[0], after[0]), f"no update at good step {step}"
            assert trainer.bad_steps == 0
    assert trainer.step == 6
    # Adam's step count: only the 4 good steps were taken.
    assert all(int(s["step"]) == 4 for s in trainer.optimizer.state_dict()["state"].values())
    err = capsys.readouterr().err
    assert "non-finite" in err and "step 3" in err and "step 5" in err and "skipped" in err
    skips = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in skips if r["type"] == "skip"] == [3, 5]


def test_too_many_consecutive_bad_steps_stop_training(tmp_path, prepared_data, seed):
    trainer = make_trainer(prepared_data, tmp_path / "run", seed, max_steps=20, max_bad_steps=3)
    poison(trainer, set(range(3, 21)), "loss")
    before = None
    with pytest.raises(NonFiniteError, match="3 consecutive steps with a non-finite loss or gradient") as err:
        for _ in range(20):
            if trainer.step == 2:
                before = snapshot(trainer)
            trainer.train_step()
    assert "--max-bad-steps" in str(err.value) and "step 5" in str(err.value)
    assert trainer.step == 4 and trainer.bad_steps == 3  # stopped during the third bad step (step 5)
    assert states_equal(before[0], snapshot(trainer)[0])  # the weights of the last good step


def test_cli_stops_with_one_line_error(tmp_path, prepared_data, capsys, monkeypatch):
    """Through `samout train`: an lr so large the loss overflows would be slow to find; poison
    the model class's forward instead so every step is non-finite."""
    from samout.cli import main
    from tests.commands.test_cli_errors import assert_one_line_error

    original = SamOut.forward
    def nan_forward(self, *args, **kwargs):
        logits, state = original(self, *args, **kwargs)
        return logits * float("nan"), state

    monkeypatch.setattr(SamOut, "forward", nan_forward)
    code = main(["train", "--data", str(prepared_data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--max-steps", "10", "--seq-len", "16", "--batch-size", "2", "--max-bad-steps", "2",
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert_one_line_error(code, last, "training stopped at step 2", "2 consecutive steps")
    assert "Traceback" not in err
