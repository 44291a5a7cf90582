"""What the endpoints share: a Run's stream chunks and its sampling per choice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from samout.serve import protocol as P
from samout.serve.serving import sampling_params
from samout.serve.serving_chat import ChatRun
from samout.serve.serving_completions import CompletionRun


@pytest.mark.parametrize("chat", [False, True])
def test_templated_text_chunks_are_the_plain_json(chat):
    """Text chunks come from a per-choice template (one json.dumps of the text per token):
    byte for byte what serialising the whole chunk gives, whatever the text holds."""
    run_class = ChatRun if chat else CompletionRun
    run = run_class.__new__(run_class)
    run.rid, run.created, run._templates = "cmpl-x", 1700000000, {}
    run.served = SimpleNamespace(name='m"odel\\n')
    for text in ["hello", ' "quoted" \\ back', "line\nnext\t", "中文 ✓", "\x00nul", "samout-text"]:
        for index in (0, 3):
            assert run._text_chunk(index, text) == run._chunk(index, text, None)
            assert json.loads(run._text_chunk(index, text)[len("data: "):])


def test_each_choice_of_a_seeded_request_has_its_own_seed():
    body = P.CompletionRequest(prompt="hi", seed=2**63 - 1, temperature=0.5, n=2)
    seeds = [sampling_params(body, 7, j).seed for j in range(2)]
    assert seeds == [2**63 - 1, 0]
    params = sampling_params(body, 7, 0)
    assert params.max_new_tokens == 7 and params.temperature == 0.5 and params.stop_at_eot
    assert sampling_params(P.CompletionRequest(prompt="hi"), 3, 1).temperature == 1.0
