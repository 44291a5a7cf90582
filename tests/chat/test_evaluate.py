"""chat-eval's figures against direct computations, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from samout.chat.evaluate import evaluate_chat
from samout.chat.tasks import make_conversation, write_task_files
from samout.chat.template import DEFAULT_CHAT_TEMPLATE, render_ids
from tests.chat.chat_fixtures import make_chat_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, tokenizer = make_chat_run(root / "run")
    files = write_task_files(root / "tasks", train=30, heldout=12, seed=5)
    return root, model, tokenizer, files


def test_figures_match_a_direct_computation(setup):
    root, model, tok, files = setup
    r = evaluate_chat(model, tok, DEFAULT_CHAT_TEMPLATE, files["sft_heldout"], files["dpo_heldout"],
                      max_new_tokens=5)
    end = tok.token_to_id("<|end|>")
    right = ended = wins = 0
    for line in files["sft_heldout"].read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids = render_ids(tok, messages[:-1], add_generation_prompt=True)
        out = []
        with torch.no_grad():
            for _ in range(5):  # greedy, the whole prefix each time
                token = int(model(torch.tensor([ids + out]))[0][0, -1].argmax())
                if token in (end, 1):
                    ended += token == end
                    break
                out.append(token)
        right += tok.decode(out, skip_special_tokens=True).strip() == messages[-1]["content"]
    for line in files["dpo_heldout"].read_text().splitlines():
        row = json.loads(line)
        scores = []
        for reply in (row["chosen"], row["rejected"]):
            prompt = render_ids(tok, row["prompt"], add_generation_prompt=True)
            full = render_ids(tok, row["prompt"] + [{"role": "assistant", "content": reply}])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0][0], -1)
            scores.append(sum(float(logp[t - 1, full[t]]) for t in range(len(prompt), len(full))))
        wins += scores[0] > scores[1]
    assert r["examples"] == 12 and r["pairs"] == 12
    assert r["exact_match"] == right / 12 and r["end_of_turn"] == ended / 12
    assert r["preference_accuracy"] == wins / 12


def test_task_answers_are_checkable():
    import random

    rng = random.Random(0)
    for _ in range(200):
        messages, wrong = make_conversation(rng)
        question, answer = messages[-2]["content"], messages[-1]["content"]
        items = question.split(": ", 1)[1].rstrip("?").split()
        right = answer.removeprefix("It is ").rstrip(".")
        assert right in items and wrong != answer and wrong.removeprefix("It is ").rstrip(".") in items
        if "largest" in question:
            assert int(right) == max(map(int, items))
        if "alphabetically" in question:
            assert right == min(items)


def test_cli_errors(setup, tmp_path):
    root, _, _, files = setup
    for args, why in [([], "give --sft FILE"), (["--sft", str(tmp_path / "none.jsonl")], "input not found")]:
        proc = subprocess.run([sys.executable, "-m", "samout", "chat-eval", str(root / "run"), *args],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and why in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
