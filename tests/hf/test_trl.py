"""samout as a TRL citizen: TRL's GRPOTrainer and SFTTrainer train a samout run through the
Hugging Face wrapper (TRL's defaults: bf16 autocast, activation checkpointing, fused head)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

import samout  # noqa: E402, F401  (registers with the Auto classes)
from samout.training.grpo.rewards import format_reward  # noqa: E402
from tests.chat.chat_fixtures import make_chat_run  # noqa: E402


@pytest.fixture
def chat_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_chat_run(tmp_path / "run")
    return tmp_path / "run"


def odd_letters(completions, **kwargs):
    """A reward that differs between a random model's completions (non-zero advantages)."""
    return [float(sum(map(ord, c[0]["content"])) % 2) for c in completions]


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 3?"}],
                               "answer": f"It is {i + 3}."} for i in range(n)])


def test_trl_grpo_trainer_trains_a_samout_run(chat_run, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(chat_run)
    tokenizer = AutoTokenizer.from_pretrained(chat_run)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=2, learning_rate=1e-2, report_to="none",
                      use_vllm=False, use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, odd_letters], args=args,
                          train_dataset=prompts(), processing_class=tokenizer)
    trainer.train()
    logs = trainer.state.log_history
    assert "rewards/odd_letters/mean" in logs[0] and "rewards/format_reward/mean" in logs[0]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_trl_sft_trainer_trains_a_samout_run(chat_run, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(chat_run)
    tokenizer = AutoTokenizer.from_pretrained(chat_run)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                            {"role": "assistant", "content": f"It is {i + 3}."}]}
                              for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                     max_length=64, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0


def test_trls_fused_head_gives_samouts_log_probabilities(chat_run):
    """TRL scores completions through `base_model` (hidden states) with left-padded prompts and
    right-padded completions: each row's log-probabilities are those of its tokens alone."""
    model = AutoModelForCausalLM.from_pretrained(chat_run).eval()
    core = model.samout
    rows = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 1:6], mask[0, 1:6] = torch.tensor(rows[0]), 1  # padded on both sides
    ids[1, 4:7], mask[1, 4:7] = torch.tensor(rows[1]), 1  # left padding only
    add_fused_lm_head(model)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    for r, (row, start) in enumerate(zip(rows, (1, 4))):
        logits, _ = core(torch.tensor([row]))
        want = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
        torch.testing.assert_close(out.log_probs[r, start:start + len(row) - 1], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="left padding only"):  # a returned state must hold no padding
        model(input_ids=ids, attention_mask=mask, use_cache=True)


def test_a_spec_lookup_of_transformers_does_not_spend_the_registration_hook():
    """TRL checks for transformers with importlib.util.find_spec before importing it; the
    Auto-class registration must still run when transformers is really imported."""
    import subprocess
    import sys

    code = ("import importlib.util, sys\nimport samout\nimportlib.util.find_spec('transformers')\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "assert 'samout' in CONFIG_MAPPING and 'samout.hf' in sys.modules\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr
