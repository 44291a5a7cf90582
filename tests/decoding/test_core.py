"""The decoding core: each batched processor equals its one-row reference row by row (random
settings per row), the sampler gives a row the same tokens alone or batched, raw logprobs,
and a token constraint (a toy grammar) plugs in."""

from __future__ import annotations

import random

import pytest
import torch

from samout.decoding import processors as P
from samout.decoding.constraint import apply_bitmask_ref, bitmask_words
from samout.decoding.logprobs import token_logprob_ref, token_logprobs
from samout.decoding.params import SamplingParams
from samout.decoding.sampler import RowSampler, sample, sample_one
from samout.errors import SamoutError

V = 97


def _logits(rng: random.Random, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(rows, V, generator=g) * 3
    x[0, :5] = 2.0  # ties
    return x


@pytest.mark.parametrize("trial", range(6))
def test_batched_processors_equal_their_row_references(trial):
    rng = random.Random(trial)
    B = 7
    x = _logits(rng, B)
    rows = list(range(B))
    pick = lambda: [rng.randrange(V) for _ in range(rng.randrange(0, 12))]  # noqa: E731
    # logit bias, masks, repetition and presence/frequency penalties
    biases = [{t: rng.uniform(-100, 100) for t in pick()} for _ in rows]
    masks = [pick() for _ in rows]
    seen = [torch.tensor(pick(), dtype=torch.long) for _ in rows]
    penalties = [rng.choice([1.0, 1.35, 1.35, 0.8, 2.0]) for _ in rows]
    generated = [pick() for _ in rows]
    counts = [{t: generated[i].count(t) for t in generated[i]} for i in rows]
    presence = [rng.uniform(-2, 2) for _ in rows]
    frequency = [rng.uniform(-2, 2) for _ in rows]
    got = x.clone()
    P.apply_logit_bias(got, rows, biases)
    P.apply_mask(got, rows, masks)
    P.apply_repetition_penalty(got, rows, seen, penalties)
    P.apply_presence_frequency(got, rows, counts, presence, frequency)
    for i in rows:
        want = P.logit_bias_ref(x[i], biases[i])
        want = P.mask_ref(want, masks[i])
        want = P.repetition_penalty_ref(want, seen[i], penalties[i])
        want = P.presence_frequency_ref(want, generated[i], presence[i], frequency[i])
        assert torch.equal(got[i], want), i
    # temperature, top-k, top-p, min-p
    temps = [rng.choice([0.7, 0.7, 1.0, 1e-6, 1.3]) for _ in rows]
    ks = [rng.choice([None, 1, 5, 40, V + 3]) for _ in rows]
    ps = [rng.choice([None, 0.5, 0.9, 1.0]) for _ in rows]
    mins = [rng.choice([0.0, 0.05, 0.3]) for _ in rows]
    base = got.clone()
    P.apply_temperature(got, temps)
    P.apply_top_k(got, ks)
    P.apply_top_p(got, ps)
    P.apply_min_p(got, mins)
    for i in rows:
        want = P.top_k_ref(P.temperature_ref(base[i], temps[i]), ks[i])
        want = P.min_p_ref(P.top_p_ref(want, ps[i]), mins[i])
        assert torch.equal(got[i], want), i


def test_bitmask_rows_equal_reference():
    rng = random.Random(0)
    x = _logits(rng, 4)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, bitmask_words(V)), dtype=torch.int32)
    got = x.clone()
    P.apply_bitmask(got, [1, 3], bitmask)
    assert torch.equal(got[0], x[0]) and torch.equal(got[2], x[2])
    for i in (1, 3):
        assert torch.equal(got[i], P.constraint_ref(x[i], bitmask[i]))
    every = x.clone()  # all rows constrained: masked in place
    P.apply_bitmask(every, [0, 1, 2, 3], bitmask)
    assert torch.equal(every, apply_bitmask_ref(x, bitmask))
    assert torch.equal(every[[1, 3]], got[[1, 3]])


def _random_params(rng: random.Random, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0, 0.7, 1.0]), top_k=rng.choice([None, 10]), top_p=rng.choice([None, 0.9]),
        min_p=rng.choice([0.0, 0.05]), repetition_penalty=rng.choice([1.0, 1.35]),
        repetition_window=rng.choice([None, 4]), presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -0.3]), logit_bias=rng.choice([None, {3: 5.0, 7: -100}]),
        min_tokens=rng.choice([0, 3]), seed=seed, logprobs=rng.choice([None, 0, 3]))


def test_a_row_samples_the_same_alone_or_batched():
    rng = random.Random(1)
    params = [_random_params(rng, seed) for seed in range(8)]
    steps = [_logits(rng, len(params)) for _ in range(12)]
    make = lambda: [RowSampler(p, prompt=[1, 2, 3], stop_ids={0}) for p in params]  # noqa: E731
    batched_rows, alone_rows = make(), make()
    for x in steps:
        tokens, lps = sample(x, batched_rows)
        for i, row in enumerate(alone_rows):
            token, lp = sample_one(x[i], row)
            assert token == tokens[i]
            assert lp == (None if lps is None else lps[i])
            row.accept(token)
            batched_rows[i].accept(token)


def test_min_tokens_masks_stop_ids_and_logprobs_are_raw():
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 50.0  # the stop token dominates
    row = RowSampler(SamplingParams(temperature=0, min_tokens=2, logprobs=2), stop_ids={0})
    tokens = []
    for _ in range(3):
        token, lp = sample_one(x[0], row)
        assert lp == token_logprob_ref(x[0], token, 2)  # the raw distribution's, mask or not
        tokens.append(token)
        row.accept(token)
    assert tokens[:2] != [0, 0] and 0 not in tokens[:2] and tokens[2] == 0


def test_logprobs_match_reference():
    x = _logits(random.Random(2), 5)
    got = token_logprobs(x, [1, 2, 3, 4, 5], [0, 1, 5, 0, 20])
    for i, lp in enumerate(got):
        ref = token_logprob_ref(x[i], i + 1, [0, 1, 5, 0, 20][i])
        assert lp.token == ref.token and lp.logprob == pytest.approx(ref.logprob, abs=1e-6)
        assert [t for t, _ in lp.top] == [t for t, _ in ref.top]


class EvenTokens:
    """A toy grammar: only even token ids, finished after `length` tokens."""

    def __init__(self, length: int) -> None:
        self.left, self.taken = length, []

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0x55555555  # bits 0, 2, 4, ... of every word

    def advance(self, token):
        self.taken.append(token)
        self.left -= 1

    def is_finished(self):
        return self.left <= 0


def test_a_token_constraint_masks_and_finishes():
    rng = random.Random(3)
    grammar = EvenTokens(5)
    rows = [RowSampler(SamplingParams(temperature=1.0, seed=0), constraint=grammar),
            RowSampler(SamplingParams(temperature=0))]
    odd_free = []
    while not rows[0].finished:
        x = _logits(rng, 2)
        tokens, _ = sample(x, rows)
        assert tokens[1] == int(x[1].argmax())  # the unconstrained row is untouched
        odd_free.append(tokens[0])
        for row, t in zip(rows, tokens):
            row.accept(t)
    assert len(odd_free) == 5 and all(t % 2 == 0 for t in odd_free) and grammar.taken == odd_free


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(min_p=1.5),
                                 dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(min_tokens=-1),
                                 dict(repetition_window=0), dict(logprobs=-1)])
def test_params_refuse_out_of_range(bad):
    with pytest.raises(SamoutError):
        SamplingParams(**bad)


class EndsAt:
    """A toy grammar that allows only token `end` (say, after a complete JSON value whose
    grammar waits for its end token): not finished until it takes it."""

    def __init__(self, end: int) -> None:
        self.end, self.taken = end, []

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0
        bitmask[row, self.end // 32] = 1 << (self.end % 32)

    def advance(self, token):
        if token != self.end:
            raise SamoutError(f"token {token} is not allowed")
        self.taken.append(token)

    def is_finished(self):
        return bool(self.taken)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_leaves_a_grammar_its_end_token(temperature):
    """min_tokens masks the stop ids, but not when the grammar allows nothing else: then every
    logit was -inf, the sampler fell back to token 0 and the grammar refused it."""
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    rows = [RowSampler(SamplingParams(temperature=temperature, seed=0, min_tokens=5), stop_ids={7},
                       constraint=EndsAt(7)),
            RowSampler(SamplingParams(temperature=temperature, seed=1, min_tokens=5), stop_ids={7},
                       constraint=EvenTokens(9))]  # more is allowed: min_tokens applies
    x[:, 7] = 50.0
    tokens, _ = sample(x, rows)
    assert tokens[0] == 7 and rows[0].is_stop(7)
    assert tokens[1] != 7 and tokens[1] % 2 == 0
