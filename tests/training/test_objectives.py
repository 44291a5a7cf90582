"""SFT (packed == unpacked), the DPO loss against a hand computation, and --init-from."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samout import SamOut, SamOutConfig, load_pretrained
from samout.chat.tasks import write_task_files
from samout.data.chat import ChatData, prepare_conversations
from samout.data.prepare import prepare
from samout.errors import SamoutError
from samout.training.config import TrainConfig
from samout.training.objectives import DPOObjective, SFTObjective, dpo_loss
from samout.training.setup import train


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("obj")
    files = write_task_files(root / "tasks", train=120, heldout=10, seed=3)
    prepare([str(files["pretrain"])], root / "pre", vocab_size=300, quiet=True)
    train(root / "pre", root / "run-pre", preset="tiny", quiet=True,
          overrides={"max_steps": 2, "seq_len": 32, "batch_size": 2, "eval_windows": 1, "warmup_steps": 1})
    prepare_conversations([str(files["sft_train"])], root / "sft", "chat", tokenizer=root / "pre", quiet=True)
    prepare_conversations([str(files["dpo_train"])], root / "dpo", "dpo", tokenizer=root / "pre", quiet=True)
    return root


def tiny_model(vocab: int, seed: int = 0) -> SamOut:
    torch.manual_seed(seed)
    return SamOut(SamOutConfig.from_preset("tiny", vocab_size=vocab))


def test_packed_sft_batch_equals_conversations_run_one_by_one(dirs):
    data = ChatData(dirs / "sft", "chat")
    cfg = TrainConfig(objective="sft", seq_len=160, batch_size=3, seed=5)
    rows = data.packed_rows(7, 0, 3, 160, 5)
    assert sum(len(r) for r in rows) > 3  # several conversations per row: really packed
    model = tiny_model(data.vocab_size)
    loss, _ = SFTObjective(data, cfg).micro_loss(model, 7, 0, 0, 1, "cpu", None)
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = 0.0, 0
    for i in [i for row in rows for i in row]:  # reference: each conversation alone, fresh state
        ids, mask = data.sequence("train", i, 160)
        logits, _ = model(torch.from_numpy(ids[None, :-1]))
        ce = F.cross_entropy(logits[0], torch.from_numpy(ids[1:]), reduction="none")
        keep = torch.from_numpy(mask[1:].astype(bool))
        total = total + ce[keep].sum()
        count += int(keep.sum())
    ref = total / count
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(packed[n], p.grad, rtol=1e-4, atol=1e-6), n
    # Without the reset, the running max would carry from one conversation into the next:
    row = [i for i in rows[0]]
    ids = np.concatenate([data.sequence("train", i)[0] for i in row])
    masks = np.concatenate([data.sequence("train", i)[1] for i in row])
    logits, _ = model(torch.from_numpy(ids[None, :-1]))
    ce = F.cross_entropy(logits[0], torch.from_numpy(ids[1:]), reduction="none")
    first = len(data.sequence("train", row[0])[0])
    later = torch.from_numpy(masks[1:].astype(bool))
    later[: first] = False
    alone = []
    for i in row[1:]:
        s, m = data.sequence("train", i)
        lg, _ = model(torch.from_numpy(s[None, :-1]))
        alone.append(F.cross_entropy(lg[0], torch.from_numpy(s[1:]), reduction="none")[torch.from_numpy(
            m[1:].astype(bool))])
    if len(row) > 1:
        assert not torch.allclose(ce[later], torch.cat(alone), atol=1e-4)


def test_sft_batches_are_a_pure_function_of_seed_and_step(dirs):
    data = ChatData(dirs / "sft")
    assert data.packed_rows(3, 1, 4, 100, 9) == ChatData(dirs / "sft").packed_rows(3, 1, 4, 100, 9)
    assert data.packed_rows(3, 1, 4, 100, 9) != data.packed_rows(4, 1, 4, 100, 9)
    both = data.packed_rows(3, 0, 2, 100, 9, rank=0, world_size=2) + data.packed_rows(3, 0, 2, 100, 9, 1, 2)
    assert both == data.packed_rows(3, 0, 4, 100, 9)


def test_dpo_loss_equals_a_hand_computation(dirs):
    data = ChatData(dirs / "dpo", "dpo")
    policy, reference = tiny_model(data.vocab_size, 1), tiny_model(data.vocab_size, 2)
    cfg = TrainConfig(objective="dpo", init_from="x", batch_size=3, seq_len=200, dpo_beta=0.3, seed=4)
    objective = DPOObjective(data, cfg, reference)
    loss, stats = objective.micro_loss(policy, 2, 0, 0, 1, "cpu", None)

    @torch.no_grad()
    def logp(model, ids, mask):  # log p(completion | prompt), token by token
        logits, _ = model(torch.from_numpy(ids[None, :-1]))
        lp = torch.log_softmax(logits[0].double(), -1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])

    margins = []
    for i in objective.pairs(2, 0, 0, 1):
        (c, cm), (r, rm) = data.sequence("train", 2 * i), data.sequence("train", 2 * i + 1)
        margins.append(0.3 * ((logp(policy, c, cm) - logp(reference, c, cm))
                              - (logp(policy, r, rm) - logp(reference, r, rm))))
    want = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    assert stats["reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-3, abs=1e-5)
    assert stats["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    # The standard form, on made-up numbers.
    pc, pr, rc, rr = map(torch.tensor, ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    got, _ = dpo_loss(pc, pr, rc, rr, 0.5)
    assert float(got) == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2)


def test_init_from_loads_exactly_the_source_weights_and_grows_the_embedding(dirs, tmp_path):
    from samout.training.init_from import load_init_model

    source = load_pretrained(dirs / "run-pre")
    data = ChatData(dirs / "sft")
    model = load_init_model(dirs / "run-pre", data)
    assert model.config.vocab_size == data.vocab_size == source.config.vocab_size + 4
    for name, tensor in source.state_dict().items():
        got = model.state_dict()[name]
        assert torch.equal(got[: tensor.shape[0]] if name in ("embed.weight", "head.weight") else got, tensor)
    # SFT through the CLI: one step, the run directory carries the chat template.
    out = tmp_path / "sft-run"
    proc = subprocess.run([sys.executable, "-m", "samout", "train", "--data", str(dirs / "sft"),
                           "--out", str(out),
                           "--init-from", str(dirs / "run-pre"), "--objective", "sft", "--max-steps", "2",
                           "--seq-len", "128", "--batch-size", "2", "--eval-windows", "1", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("type") == "eval" and "val_assistant_tokens" in r for r in evals)


def test_init_from_errors(dirs, tmp_path):
    other = tmp_path / "other"
    prepare_conversations([str(dirs / "tasks" / "sft_train.jsonl")], other, "chat", vocab_size=290,
                          quiet=True)
    cases = [
        (["--data", str(other), "--objective", "sft", "--init-from", str(dirs / "run-pre")],
         "does not match"),
        (["--data", str(dirs / "sft"), "--objective", "sft", "--init-from", str(dirs / "run-pre"),
          "--hidden-size", "32"], "takes the model as it is"),
        (["--data", str(dirs / "sft"), "--objective", "dpo", "--init-from", str(dirs / "run-pre")],
         "holds chat data, not dpo"),
        (["--data", str(dirs / "dpo"), "--objective", "dpo"], "needs --init-from"),
        (["--data", str(dirs / "sft"), "--objective", "sft", "--init-from", str(tmp_path)], "no model there"),
    ]
    for i, (args, why) in enumerate(cases):
        proc = subprocess.run([sys.executable, "-m", "samout", "train", "--out", str(tmp_path / f"r{i}"),
                               "--max-steps", "1", "--quiet", *args], capture_output=True, text=True)
        assert proc.returncode == 1 and why in proc.stderr, (why, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
    with pytest.raises(SamoutError, match="objective must be"):
        TrainConfig(objective="rlhf")


def test_dpo_training_runs_and_logs_margins(dirs, tmp_path):
    sft = tmp_path / "sft"
    train(dirs / "sft", sft, quiet=True, overrides={"objective": "sft", "init_from": str(dirs / "run-pre"),
                                                    "max_steps": 1, "seq_len": 128, "batch_size": 2,
                                                    "eval_windows": 1})
    prepare_conversations([str(dirs / "tasks" / "dpo_train.jsonl")], tmp_path / "dpo", "dpo", tokenizer=sft,
                          quiet=True)
    result = train(tmp_path / "dpo", tmp_path / "dpo-run", quiet=True,
                   overrides={"objective": "dpo", "init_from": str(sft), "max_steps": 2, "seq_len": 128,
                              "batch_size": 2, "eval_windows": 1, "lr": 1e-3})
    assert "val_reward_accuracy" in result and "val_preference_accuracy" in result
    log = [json.loads(line) for line in (tmp_path / "dpo-run" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r.get("type") == "train")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert {"reward_margin", "reward_accuracy"} <= set(first)


def test_sft_resume_is_exact(dirs, tmp_path):
    settings = {"objective": "sft", "init_from": str(dirs / "run-pre"), "seq_len": 96, "batch_size": 2,
                "eval_windows": 1, "save_every": 2, "warmup_steps": 1}
    train(dirs / "sft", tmp_path / "whole", quiet=True, overrides={**settings, "max_steps": 4})
    train(dirs / "sft", tmp_path / "split", quiet=True, overrides={**settings, "max_steps": 2})
    train(dirs / "sft", tmp_path / "split", quiet=True, resume=True, overrides={"max_steps": 4})
    a, b = load_pretrained(tmp_path / "whole"), load_pretrained(tmp_path / "split")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
