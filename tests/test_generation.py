"""Generation with the recurrent state: same tokens as recomputing the prefix, sampling knobs."""

import pytest
import torch

from samout import SamOut, SamOutConfig
from samout.errors import SamoutError
from samout.generation import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    generate,
    load_for_generation,
    stream_ids,
)
from samout.tokenizer import EOT_ID


@pytest.mark.parametrize("mixer", ["openash", "gen3", "conv"])
def test_stateful_decoding_equals_greedy_recompute(seed, mixer):
    model = SamOut(SamOutConfig.from_preset("tiny", mixer=mixer)).eval()
    prompt = torch.randint(2, 512, (7,)).tolist()
    new = list(stream_ids(model, prompt, max_new_tokens=24, temperature=0.0, stop_at_eot=False))
    # Reference: no state, the whole prefix again at every step.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert new == ids[len(prompt):]


def test_seed_makes_sampling_reproducible(seed):
    model = SamOut(SamOutConfig.from_preset("tiny")).eval()
    run = lambda s: list(stream_ids(model, [1, 5, 9], max_new_tokens=20, temperature=1.0, seed=s))  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_stops_at_end_of_text():
    model = SamOut(SamOutConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[EOT_ID] = 1.0  # every position predicts <|endoftext|>... unless x sums < 0
        model.layers[-1].layer_norm.bias.fill_(10.0)  # make the hidden state positive
    assert list(stream_ids(model, [5, 6], max_new_tokens=10, temperature=0.0)) == []
    assert len(list(stream_ids(model, [5, 6], max_new_tokens=10, temperature=0.0, stop_at_eot=False))) == 10


def test_top_k_top_p_and_repetition_penalty():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    keep2 = [True, True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=None)).tolist() == keep2
    probs = torch.softmax(logits, -1)  # [0.64, 0.23, 0.09, ...]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isfinite(filter_logits(logits, None, top_p=0.7)).tolist() == keep2
    keep1 = [True, False, False, False, False]
    assert torch.isfinite(filter_logits(logits, None, top_p=0.5)).tolist() == keep1
    penalised = apply_repetition_penalty(logits, torch.tensor([0, 4]), 2.0)
    assert penalised.tolist() == [1.5, 2.0, 1.0, 0.0, -2.0]
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=1.5), dict(repetition_penalty=0)):
        with pytest.raises(SamoutError):
            SamplingParams(**bad)


def test_generate_text_from_a_run(trained_run):
    model, tokenizer = load_for_generation(trained_run)
    a = generate(model, tokenizer, "To be", max_new_tokens=12, seed=1)
    assert a == generate(model, tokenizer, "To be", max_new_tokens=12, seed=1)
    assert isinstance(a, str) and a
    assert a != generate(model, tokenizer, "To be", max_new_tokens=12, seed=2)
    assert generate(model, tokenizer, "To be", max_new_tokens=0) == ""


def test_generate_prints_logprobs(trained_run, capsys):
    import json

    from samout.cli import main
    from samout.decoding.logprobs import token_logprob_ref
    from samout.generation import encode_prompt, stream_logprobs

    args = ["generate", str(trained_run), "--prompt", "To be", "--max-new-tokens", "6", "--temperature", "0",
            "--logprobs", "3"]
    assert main(args + ["--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokens, end = lines[:-1], lines[-1]
    model, tokenizer = load_for_generation(trained_run)
    ids = encode_prompt(tokenizer, "To be")
    want = list(stream_logprobs(model, ids, SamplingParams(max_new_tokens=6, temperature=0, logprobs=3)))
    assert [t["token"] for t in tokens] == [t for t, _ in want]
    assert end["text"] == generate(model, tokenizer, "To be", max_new_tokens=6, temperature=0)
    for line in tokens:  # the raw distribution's, greedy: the token is the most likely
        assert len(line["top_logprobs"]) == 3 and line["top_logprobs"][0]["token"] == line["token"]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + [t for t, _ in want][:-1]]))
    ref = token_logprob_ref(logits[0, -1], want[-1][0], 3)
    assert tokens[-1]["logprob"] == pytest.approx(ref.logprob, abs=1e-5)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "logprob" in table and len(table.splitlines()) >= 6 + 2
