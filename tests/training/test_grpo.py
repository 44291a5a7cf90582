"""GRPO: ratio exactly 1 before an update, no padding in rollouts, the loss against a plain
reference, reward loading, exact resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from samout import load_pretrained
from samout.chat.tasks import write_task_files
from samout.data.chat import prepare_conversations
from samout.data.prepare import prepare
from samout.data.prompts import PromptData, prepare_prompts
from samout.errors import SamoutError
from samout.models.transformer import Transformer
from samout.models.transformer_config import TransformerConfig
from samout.training.config import TrainConfig
from samout.training.grpo.loss import group_advantages, grpo_loss
from samout.training.grpo.objective import GRPOObjective
from samout.training.grpo.rewards import format_reward, load_reward, score, task_reward
from samout.training.grpo.rollout import completion_logps, generator_for, sample_group
from samout.training.setup import train


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    files = write_task_files(root / "tasks", train=120, heldout=10, seed=3)
    prepare([str(files["pretrain"])], root / "pre", vocab_size=300, quiet=True)
    train(root / "pre", root / "run-pre", preset="tiny", quiet=True,
          overrides={"max_steps": 2, "seq_len": 32, "batch_size": 2, "eval_windows": 1, "warmup_steps": 1})
    prepare_conversations([str(files["sft_train"])], root / "sft", "chat", tokenizer=root / "run-pre",
                          quiet=True)
    train(root / "sft", root / "run-sft", quiet=True,
          overrides={"objective": "sft", "init_from": str(root / "run-pre"), "max_steps": 1, "seq_len": 128,
                     "batch_size": 2, "eval_windows": 1})
    prepare_prompts([str(files["grpo_train"])], root / "prompts", tokenizer=root / "run-sft", quiet=True)
    return root


def grpo_cfg(dirs, **kw) -> TrainConfig:
    settings = dict(objective="grpo", init_from=str(dirs / "run-sft"), reward=["task", "format"],
                    num_generations=4, max_completion_length=6, batch_size=3, seed=7)
    return TrainConfig(**{**settings, **kw})


def test_ratio_is_exactly_one_before_the_first_update(dirs):
    data = PromptData(dirs / "prompts")
    model = load_pretrained(dirs / "run-sft")
    objective = GRPOObjective(data, grpo_cfg(dirs, grpo_iterations=2))
    loss1, stats1 = objective.micro_loss(model, 0, 0, 0, 1, "cpu", None)
    loss2, stats2 = objective.micro_loss(model, 1, 0, 0, 1, "cpu", None)  # same rollouts, no update between
    assert stats1["ratio_mean"] == 1.0 and stats2["ratio_mean"] == 1.0
    assert stats2["clip_fraction"] == 0.0 and "rollout_tokens_per_s" not in stats2
    assert torch.equal(loss1, loss2)
    # The kept old log-probabilities are the raw policy's (no sampling processors): recomputed alike.
    batch = objective.cache[(0, 0)]
    for g, group in enumerate(batch["groups"]):
        logps, _ = completion_logps(model, group["prompt"], group["completions"])
        assert torch.equal(logps.detach(), batch["old"][g])


def test_rollouts_do_not_depend_on_the_other_prompts_of_the_batch(dirs):
    data = PromptData(dirs / "prompts")
    model = load_pretrained(dirs / "run-sft").eval()
    objective = GRPOObjective(data, grpo_cfg(dirs))
    lengths = {i: len(data.prompt_ids("train", i)) for i in range(data.num_prompts("train"))}
    a = min(lengths, key=lengths.get)
    b = max(lengths, key=lengths.get)
    assert lengths[a] < lengths[b]  # prompts of different lengths
    both = objective.rollout(model, "train", [(0, a), (1, b)], (7, 0, 0), 4, 1.0)
    alone = objective.rollout(model, "train", [(1, b)], (7, 0, 0), 4, 1.0)
    assert both["groups"][1]["completions"] == alone["groups"][0]["completions"]
    assert torch.equal(both["rewards"][1], alone["rewards"][0])
    completions = alone["groups"][0]["completions"]
    lp_alone, mask = completion_logps(model, data.prompt_ids("train", b), completions)
    # Reference: every completion run on its own, prompt + completion in one call, no padding anywhere.
    for r, c in enumerate(completions):
        logits, _ = model(torch.tensor([data.prompt_ids("train", b) + c]))
        logp = torch.log_softmax(logits[0, lengths[b] - 1:-1].float(), -1)
        want = logp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp_alone[r, :len(c)], want, rtol=1e-4, atol=1e-5)
        assert int(mask[r].sum()) == len(c)


def test_a_forked_transformer_cache_samples_like_separate_prefills():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4)).eval()
    prompt = [3, 4, 5, 6]
    forked = sample_group(model, prompt, 3, 5, 1.0, generator_for(1, 2), {1})
    logps, mask = completion_logps(model, prompt, forked)
    for r, c in enumerate(forked):
        logits, _ = model(torch.tensor([prompt + c]))
        want = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), -1).gather(
            -1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(logps[r, :len(c)], want, rtol=1e-4, atol=1e-5)


def reference_loss(logps, old, adv, mask, eps, ref=None, beta=0.0, loss_type="grpo", max_len=None):
    """The GRPO loss by plain Python loops."""
    rows = []
    total = 0.0
    for i in range(len(logps)):
        terms = []
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            term = -min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            if beta:
                d = ref[i][t] - logps[i][t]
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        rows.append(sum(terms) / max(len(terms), 1))
        total += sum(terms)
    if loss_type == "grpo":
        return sum(rows) / len(rows)
    return total / (len(logps) * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_loss_against_a_plain_reference(loss_type, beta):
    logps = [[-1.0, -0.5, -2.0], [-0.3, -0.9, -0.1], [-2.5, -0.2, -0.7]]
    old = [[-1.2, -0.5, -1.0], [-0.3, -1.5, -0.1], [-2.0, -0.2, -0.9]]  # ratios outside [0.8, 1.2] too
    ref = [[-1.1, -0.4, -1.9], [-0.2, -1.0, -0.3], [-2.4, -0.5, -0.6]]
    mask = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    adv = [1.5, -0.7, 0.4]
    f64 = dict(dtype=torch.float64)
    loss, stats = grpo_loss(torch.tensor(logps, **f64), torch.tensor(old, **f64), torch.tensor(adv, **f64),
                            torch.tensor(mask).bool(), 0.2, torch.tensor(ref, **f64), beta, loss_type,
                            max_completion_length=4)
    want = reference_loss(logps, old, adv, mask, 0.2, ref, beta, loss_type, 4)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert 0 < float(stats["clip_fraction"]) < 1
    if beta:
        kls = [math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1
               for i in range(3) for t in range(3) if mask[i][t]]
        assert float(stats["kl"]) == pytest.approx(sum(kls) / len(kls), rel=1e-12)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(sum((x - 0.5) ** 2 for x in (1, 0, 0, 1)) / 3)
    want = [[(x - 0.5) / (std + 1e-4) for x in (1, 0, 0, 1)], [0.0] * 4]
    torch.testing.assert_close(group_advantages(rewards), torch.tensor(want))
    torch.testing.assert_close(group_advantages(rewards, scale=False),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]))


def test_builtin_rewards_and_weights():
    prompts = [[{"role": "user", "content": "Which number is the largest: 4 19 7?"}]] * 3
    replies = ("It is 19.", "It is 7.", "19, since it is big")
    completions = [[{"role": "assistant", "content": c}] for c in replies]
    assert task_reward(completions, prompts=prompts) == [1.0, 0.0, 0.0]
    assert format_reward(completions) == [1.0, 1.0, 0.0]
    total, per = score([("task", task_reward), ("format", format_reward)], [1.0, 0.5], completions,
                       prompts=prompts)
    assert total == [1.5, 0.5, 0.0] and per["task"] == [1.0, 0.0, 0.0]
    # A reply that rambles on after the answer earns nothing for its length.
    assert task_reward([[{"role": "assistant", "content": "It is 19. It is 19 because 19 > 7 > 4."}]],
                       prompts=prompts[:1]) == [0.0]


def test_user_reward_loading(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def short(completions, answer, **kwargs):  # TRL's signature; a column arrives by name
            return [float(len(c[0]["content"]) < 20 and a is not None) for c, a in zip(completions, answer)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = load_reward("my_rewards:short")
    assert name == "short"
    assert fn([[{"role": "assistant", "content": "hi"}]], answer=["x"]) == [1.0]
    for spec, why in [("nosuch", "unknown reward"), ("my_rewards:nope", "has no 'nope'"),
                      ("no_such_module_26:f", "cannot import")]:
        with pytest.raises(SamoutError, match=why) as err:
            load_reward(spec)
        assert "\n" not in str(err.value)


def test_cli_errors_are_one_line(dirs, tmp_path):
    cases = [(["--reward", "no_such_module_26:f"], "cannot import"),
             ([], "needs --reward"),
             (["--reward", "task", "--reward-weights", "1,2"], "one weight per --reward"),
             (["--reward", "task", "--num-generations", "1"], "at least 2"),
             (["--reward", "task", "--fsdp"], "does not run with --fsdp")]
    for extra, why in cases:
        proc = subprocess.run([sys.executable, "-m", "samout", "train", "--data", str(dirs / "prompts"),
                               "--out", str(tmp_path / "run"), "--objective", "grpo", "--init-from",
                               str(dirs / "run-sft"), "--quiet", *extra], capture_output=True, text=True)
        assert proc.returncode == 1 and why in proc.stderr, (why, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr


def test_grpo_resume_is_exact_in_the_middle_of_the_iterations(dirs, tmp_path):
    settings = {"objective": "grpo", "init_from": str(dirs / "run-sft"),
                "reward": ["task", "tests.training.grpo_rewards:odd_first_token"],
                "reward_weights": [1.0, 0.5],
                "num_generations": 3, "max_completion_length": 5, "temperature": 1.5, "batch_size": 2,
                "grpo_iterations": 2, "kl_beta": 0.05, "eval_windows": 1, "log_every": 1, "warmup_steps": 1,
                "min_lr_ratio": 1.0, "lr": 1e-2, "eval_every": 100}
    train(dirs / "prompts", tmp_path / "whole", quiet=True, overrides={**settings, "max_steps": 4})
    train(dirs / "prompts", tmp_path / "split", quiet=True, overrides={**settings, "max_steps": 3})
    train(dirs / "prompts", tmp_path / "split", quiet=True, resume=True, overrides={"max_steps": 4})
    a, b = load_pretrained(tmp_path / "whole"), load_pretrained(tmp_path / "split")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    def train_log(run):
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "per_s" not in k and k != "elapsed"}
                for r in records if r["type"] == "train"]

    whole = train_log(tmp_path / "whole")
    assert whole == train_log(tmp_path / "split")
    assert whole[0]["kl"] == 0.0 and whole[0]["ratio_mean"] == 1.0  # policy == reference at step 1
    for key in ("reward_mean", "reward_std", "reward_task_mean", "reward_odd_first_token_std",
                "frac_zero_std", "clip_fraction", "completion_length"):
        assert key in whole[0]
    assert any(r["reward_std"] > 0 for r in whole) and whole[3]["ratio_mean"] != 1.0  # really learning
    assert (tmp_path / "whole" / "loss.png").is_file()


def test_an_update_raises_the_log_probability_of_better_completions(dirs):
    data = PromptData(dirs / "prompts")
    model = load_pretrained(dirs / "run-sft")
    cfg = grpo_cfg(dirs, reward=["tests.training.grpo_rewards:odd_first_token"], temperature=1.5)
    objective = GRPOObjective(data, cfg)
    loss, stats = objective.micro_loss(model, 0, 0, 0, 1, "cpu", None)
    assert stats["frac_zero_std"] < 1
    loss.backward()
    batch = objective.cache[(0, 0)]

    def weighted_logps() -> float:
        total = 0.0
        for g, group in enumerate(batch["groups"]):
            logps, mask = completion_logps(model, group["prompt"], group["completions"])
            total += float((logps.sum(1) / mask.sum(1) * batch["advantages"][g]).sum().detach())
        return total

    before = weighted_logps()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    assert weighted_logps() > before


@pytest.mark.slow
def test_grpo_killed_with_sigkill_then_resumed_ends_bit_identical(dirs, tmp_path):
    import os
    import signal
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    max_steps = 16

    def command(run, *extra):
        return [sys.executable, "-m", "samout", "train", "--data", str(dirs / "prompts"), "--out", str(run),
                "--objective", "grpo", "--init-from", str(dirs / "run-sft"), "--reward", "task",
                "--reward", "tests.training.grpo_rewards:odd_first_token", "--num-generations", "3",
                "--max-completion-length", "5", "--temperature", "1.5", "--batch-size", "2",
                "--grpo-iterations", "2", "--kl-beta", "0.05", "--max-steps", str(max_steps), "--lr", "1e-2",
                "--warmup-steps", "1", "--log-every", "1", "--eval-every", "1000", "--eval-windows", "1",
                "--device", "cpu", "--quiet", *extra]

    def steps_logged(run) -> int:
        try:
            lines = (run / "log.jsonl").read_text().splitlines()
            return max([0] + [json.loads(line)["step"] for line in lines])
        except (OSError, json.JSONDecodeError, KeyError):
            return 0

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(command(straight, "--save-every", "1000"), env=env, cwd=root, check=True,
                   capture_output=True)
    victim = subprocess.Popen(command(crashed, "--save-every", "3"), env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while steps_logged(crashed) < 8 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL and steps_logged(crashed) < max_steps
    proc = subprocess.run([*command(crashed, "--save-every", "3"), "--resume"], env=env, cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_process_grpo_resume_in_the_middle_of_the_iterations_is_exact(dirs, tmp_path):
    """torchrun x 2 (gloo, CPU): stopped after step 3 of 4 (the second step of --grpo-iterations
    2 still to run on the kept rollouts), then resumed: the same weights and losses as one
    uninterrupted 2-process run. Each rank resumes with its own rollouts, not rank 0's."""
    import os

    from samout.run_dir import list_checkpoints, load_training_state

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = tmp_path / "grpo.json"
    config.write_text(json.dumps({"min_lr_ratio": 1.0}))  # the same learning rates whatever --max-steps

    def torchrun(run, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "samout", "train", "--data", str(dirs / "prompts"), "--out", str(run),
               "--objective", "grpo", "--init-from", str(dirs / "run-sft"), "--reward", "task",
               "--reward", "tests.training.grpo_rewards:odd_first_token", "--num-generations", "3",
               "--max-completion-length", "5", "--temperature", "1.5", "--batch-size", "2",
               "--grpo-iterations", "2", "--kl-beta", "0.05", "--lr", "1e-2", "--config", str(config),
               "--warmup-steps", "1", "--log-every", "1", "--eval-every", "1000", "--eval-windows", "1",
               "--save-every", "1000", "--device", "cpu", "--seed", "7", "--quiet", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    whole, split = tmp_path / "whole", tmp_path / "split"
    torchrun(whole, "--max-steps", "4")
    torchrun(split, "--max-steps", "3")
    kept = load_training_state(list_checkpoints(split)[-1])["objective_per_rank"]
    assert len(kept) == 2 and all(len(rank["cache"]) == 1 for rank in kept)
    prompts = [[g["index"] for g in rank["cache"][0]["groups"]] for rank in kept]
    assert prompts[0] != prompts[1]  # each rank kept its own rollouts
    torchrun(split, "--max-steps", "4", "--resume")

    a, b = load_pretrained(whole), load_pretrained(split)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    def losses(run):
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["ratio_mean"]) for r in records if r["type"] == "train"]

    assert len(losses(whole)) == 4 and losses(whole) == losses(split)


def test_each_rank_reloads_its_own_kept_rollouts_and_none_from_another_layout():
    from types import SimpleNamespace

    from samout.training.trainer import Trainer

    def own(state, rank, world_size):
        return Trainer._own_objective_state(SimpleNamespace(rank=rank, world_size=world_size), state)

    saved = {"objective_per_rank": [{"cache": ["rank 0"]}, {"cache": ["rank 1"]}]}
    assert own(saved, 1, 2) == {"cache": ["rank 1"]} and own(saved, 0, 2) == {"cache": ["rank 0"]}
    assert own(saved, 0, 1) == {} and own(saved, 2, 4) == {}  # another number of processes
    legacy = {"objective": {"cache": ["rank 0"]}}  # before objective_per_rank: rank 0's alone
    assert own(legacy, 0, 1) == {"cache": ["rank 0"]} and own(legacy, 1, 2) == {}
