"""The engine against samout.generation: the same tokens alone, batched with others, with
chunked prefill, and resumed from the state cache; cancelled requests free their slots."""

from __future__ import annotations

import threading

import pytest
import torch

from samout.generation import SamplingParams, stream_ids
from samout.serve.engine import Engine, QueueFullError
from samout.serve.state_cache import StateCache


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish = None
        self.cached_tokens = None
        self.done = threading.Event()

    def __call__(self, event: tuple) -> None:
        if event[0] == "admitted":
            self.cached_tokens = event[1]
        elif event[0] == "token":
            self.tokens.append(event[1])
        else:
            self.finish = event
            self.done.set()


def run_jobs(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[Collector]:
    """Submit every job before the engine starts, so they are all decoded together."""
    outs = [Collector() for _ in jobs]
    for (prompt, params), out in zip(jobs, outs):
        engine.submit(prompt, params, out)
    engine.start()
    for out in outs:
        assert out.done.wait(60), "a request did not finish"
    engine.shutdown()
    return outs


def reference(model, prompt, params) -> list[int]:
    return list(stream_ids(model, prompt, params))


def _prompts(vocab: int, seed: int, count: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 9, 17, 40, 25, 2, 11][:count]
    return [[1] + torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("which", ["samout", "transformer"])
def test_greedy_alone_and_batched_equals_generation(serve_models, which, seed):
    model = serve_models[0] if which == "samout" else serve_models[1]
    prompts = _prompts(model.config.vocab_size, seed)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eot=False)
    want = [reference(model, p, params) for p in prompts]
    alone = [run_jobs(Engine(model, prefill_chunk=8), [(p, params)])[0].tokens for p in prompts]
    engine = Engine(model, prefill_chunk=8)
    batched = run_jobs(engine, [(p, params) for p in prompts])
    assert engine.peak_active == len(prompts)
    assert alone == want
    assert [b.tokens for b in batched] == want
    assert all(b.finish[1] == "length" and b.finish[2]["completion_tokens"] == 12 for b in batched)


@pytest.mark.parametrize("which", ["samout", "transformer"])
def test_seeded_sampling_is_the_same_batched_or_alone(serve_models, which, seed):
    model = serve_models[0] if which == "samout" else serve_models[1]
    prompts = _prompts(model.config.vocab_size, seed, count=4)
    jobs = [(p, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed + i,
                               stop_at_eot=False)) for i, p in enumerate(prompts)]
    want = [reference(model, p, params) for p, params in jobs]
    assert [o.tokens for o in run_jobs(Engine(model, prefill_chunk=16), jobs)] == want
    assert run_jobs(Engine(model), jobs[:1])[0].tokens == want[0]


@pytest.mark.parametrize("which", ["samout", "transformer"])
def test_state_cache_hit_gives_the_cold_tokens(serve_models, which, seed):
    model = serve_models[0] if which == "samout" else serve_models[1]
    first_prompt = _prompts(model.config.vocab_size, seed, count=5)[4]
    cache = StateCache(1 << 26)
    engine = Engine(model, prefill_chunk=8, cache=cache).start()
    first = Collector()
    engine.submit(first_prompt, SamplingParams(max_new_tokens=6, temperature=0.9, seed=seed,
                                               stop_at_eot=False), first)
    assert first.done.wait(60)
    follow_up = first_prompt + first.tokens + [7, 8, 9]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed + 1, stop_at_eot=False)
    hit = Collector()
    engine.submit(follow_up, params, hit)
    assert hit.done.wait(60)
    # The last generated token was sampled but never fed, so the state covers one token less.
    assert hit.cached_tokens == len(first_prompt) + len(first.tokens) - 1
    assert hit.finish[2]["cached_tokens"] == hit.cached_tokens
    # A prompt that is exactly a cached prefix resumes from the longest shorter one (the first
    # turn's prompt): entries keep no logits, so at least one token is fed.
    exact_prompt = first_prompt + first.tokens[:-1]
    exact = Collector()
    engine.submit(exact_prompt, params, exact)
    assert exact.done.wait(60)
    engine.shutdown()
    assert exact.cached_tokens == len(first_prompt)
    cold, exact_cold = run_jobs(Engine(model, prefill_chunk=8), [(follow_up, params), (exact_prompt, params)])
    assert cold.cached_tokens == exact_cold.cached_tokens == 0
    assert hit.tokens == cold.tokens == reference(model, follow_up, params)
    assert exact.tokens == exact_cold.tokens == reference(model, exact_prompt, params)


def test_cancelled_request_frees_its_slot(serve_models):
    model = serve_models[0]
    engine = Engine(model, max_batch=1).start()
    long = Collector()
    seen_first = threading.Event()

    def emit(event):
        long(event)
        if event[0] == "token":
            seen_first.set()

    request = engine.submit([1, 9, 10], SamplingParams(max_new_tokens=100_000, temperature=0,
                                                       stop_at_eot=False), emit)
    assert seen_first.wait(30)
    short = Collector()
    engine.submit([1, 11], SamplingParams(max_new_tokens=3, temperature=0, stop_at_eot=False), short)
    engine.abort(request)
    assert short.done.wait(30), "the waiting request never got the freed slot"
    count = len(long.tokens)
    engine.shutdown()
    assert long.finish is None and len(long.tokens) == count < 100_000
    assert engine.stats()["active"] == 0


def test_queue_bound_raises_queue_full(serve_models):
    engine = Engine(serve_models[0], max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    params = SamplingParams(max_new_tokens=1)
    for _ in range(3):  # one free slot + two queue places
        engine.submit([1, 5], params, lambda e: None)
    with pytest.raises(QueueFullError):
        engine.submit([1, 5], params, lambda e: None)


def _record_decode_batches(model) -> tuple[list[int], object]:
    """Batch sizes of the model's padded (cache_lengths) calls, via a forward pre-hook."""
    sizes: list[int] = []

    def hook(module, args, kwargs):
        if kwargs.get("cache_lengths") is not None:
            sizes.append(args[0].shape[0])

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("sampled", [False, True])
def test_transformer_batched_decode_with_joins_and_leaves_equals_alone(serve_models, seed, sampled):
    """Sequences of different cache lengths decode in one padded batch; some leave early
    (short max_tokens), others join while the batch runs: every one gets its tokens alone,
    and the reference path (batched_decode=False) gives the same."""
    model = serve_models[1]
    prompts = _prompts(model.config.vocab_size, seed, count=8)
    jobs = [(p, SamplingParams(max_new_tokens=[3, 14, 6, 14, 1, 9, 14, 4][i],
                               temperature=1.0 if sampled else 0, top_p=0.9, seed=seed + i,
                               stop_at_eot=False)) for i, p in enumerate(prompts)]
    want = [reference(model, p, params) for p, params in jobs]
    reference_outs = run_jobs(Engine(model, prefill_chunk=8, batched_decode=False), jobs)
    assert [o.tokens for o in reference_outs] == want

    sizes, handle = _record_decode_batches(model)
    try:
        engine = Engine(model, prefill_chunk=8).start()
        outs = [Collector() for _ in jobs]
        for (prompt, params), out in zip(jobs[:5], outs[:5]):
            engine.submit(prompt, params, out)
        assert outs[0].done.wait(60)  # the first has left: the later ones join a running batch
        for (prompt, params), out in zip(jobs[5:], outs[5:]):
            engine.submit(prompt, params, out)
        for out in outs:
            assert out.done.wait(60)
        engine.shutdown()
    finally:
        handle.remove()
    assert [o.tokens for o in outs] == want
    assert max(sizes) >= 3, sizes  # really batched, not one sequence at a time
    assert engine.stats()["active"] == 0 and engine._batches == []


@pytest.mark.parametrize("window", [None, 6])
def test_hybrid_sequences_of_different_lengths_decode_together(window, seed):
    # A hybrid's attention state grows with each sequence's length (up to the window), so
    # sequences of different lengths cannot share one stacked state; the engine groups them.
    from samout import SamOut, SamOutConfig

    model = SamOut(SamOutConfig.from_preset("tiny", layer_types=["maxstate", "attention"],
                                            attention_window=window)).eval()
    prompts = _prompts(model.config.vocab_size, seed)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eot=False)
    want = [reference(model, p, params) for p in prompts]
    outs = run_jobs(Engine(model, prefill_chunk=8), [(p, params) for p in prompts])
    assert [o.tokens for o in outs] == want
    assert all(o.finish[1] == "length" for o in outs)


def test_int8_samout_has_an_explicit_empty_state():
    from samout import SamOut, SamOutConfig
    from samout.quant import convert_for_inference

    model = convert_for_inference(SamOut(SamOutConfig.from_preset("tiny")).eval(), "int8")
    state = model.init_state(2)
    assert state[0]["running_max"].dtype == torch.float32
    assert torch.isneginf(state[0]["running_max"]).all()


def test_deliver_hands_each_step_over_at_once_with_the_same_tokens(serve_models, seed):
    """With `deliver` (what the HTTP server sets) the events of one loop iteration arrive
    in one call, in order; the tokens are those of the plain engine."""
    model = serve_models[0]
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eot=False)
    jobs = [(p, params) for p in _prompts(model.config.vocab_size, seed, 4)]
    plain = [o.tokens for o in run_jobs(Engine(model, prefill_chunk=8), jobs)]
    batches: list[list] = []

    def deliver(batch):
        batches.append(batch)
        for emit, event in batch:
            emit(event)

    outs = run_jobs(Engine(model, prefill_chunk=8, deliver=deliver), jobs)
    assert [o.tokens for o in outs] == plain
    assert all(o.finish[0] == "finish" for o in outs)
    # Decode steps carry one token per running request in a single batch.
    assert max(sum(e[0] == "token" for _, e in b) for b in batches) == len(jobs)
    assert len(batches) < sum(len(b) for b in batches)


@pytest.mark.parametrize("which", ["samout", "transformer"])
def test_equal_chunks_prefill_in_one_call_with_the_tokens_of_each_alone(serve_models, which, seed):
    """Prompts of equal length arriving together are prefilled in one batched call (and
    equal-length follow-ups of cached conversations too); each gets its tokens alone."""
    model = serve_models[0] if which == "samout" else serve_models[1]
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(6, model.config.vocab_size, (11,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_at_eot=False)
    prefill_batches: list[int] = []

    def hook(module, args, kwargs):
        if args[0].shape[1] > 1:  # a prompt chunk, not a decode step
            prefill_batches.append(args[0].shape[0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cache = StateCache(1 << 26)
        firsts = run_jobs(Engine(model, prefill_chunk=64, cache=cache), [(p, params) for p in prompts])
        assert prefill_batches == [4]
        prefill_batches.clear()
        turns = [p + out.tokens[:-1] + [7, 8, 9] for p, out in zip(prompts, firsts)]
        seconds = run_jobs(Engine(model, prefill_chunk=64, cache=cache), [(t, params) for t in turns])
        assert prefill_batches == [4]  # every follow-up feeds its 3 new tokens in the same call
    finally:
        handle.remove()
    assert all(out.cached_tokens == len(t) - 3 for out, t in zip(seconds, turns))
    for p, out in zip(prompts, firsts):
        assert out.tokens == reference(model, p, params)
    for t, out in zip(turns, seconds):
        assert out.tokens == reference(model, t, params)


def test_a_prefill_that_fails_fails_only_its_request(serve_models, seed):
    """A batched prefill call that raises is retried one request at a time: the request
    whose prompt breaks the model gets an error, the others their tokens."""
    inner = serve_models[0]

    class Poisoned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids, state=None, **kwargs):
            if (ids == 13).any():
                raise RuntimeError("poisoned token")
            return self.inner(ids, state, **kwargs)

    good = [1, 20, 21, 22, 23]
    bad = [1, 20, 13, 22, 23]
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eot=False)
    ok, broken = run_jobs(Engine(Poisoned(), prefill_chunk=64), [(good, params), (bad, params)])
    assert ok.tokens == reference(inner, good, params) and ok.finish[0] == "finish"
    assert broken.finish[0] == "error" and "prefill failed" in broken.finish[1] and broken.tokens == []


def test_on_idle_runs_once_after_work_then_waits_for_more_work(serve_models):
    """The server returns freed memory to the OS from `on_idle`: once per burst of work, after
    `idle_seconds` without any, never while requests run and never when nothing ran."""
    model = serve_models[0]
    calls: list[tuple[int, int]] = []
    engine: Engine | None = None

    def on_idle() -> None:
        calls.append((len(engine._active), len(engine._waiting)))

    engine = Engine(model, on_idle=on_idle, idle_seconds=0.05).start()
    try:
        threading.Event().wait(0.3)
        assert calls == []  # no work yet: nothing to hand back
        params = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eot=False)
        first = Collector()
        engine.submit([1, 5, 6, 7], params, first)
        assert first.done.wait(60)
        threading.Event().wait(0.5)
        assert calls == [(0, 0)]  # once, with nothing running or waiting
        second = Collector()
        engine.submit([1, 5, 6, 7], params, second)  # the engine still takes work after it
        assert second.done.wait(60) and second.tokens == first.tokens
        threading.Event().wait(0.5)
        assert calls == [(0, 0), (0, 0)]
    finally:
        engine.shutdown()


def test_a_token_constraint_masks_batched_rows_and_finishes_with_stop(serve_models):
    """A grammar plugs in through `submit(constraint=...)` (samout.decoding.constraint): its
    row is masked, the other rows of the batch are not, and it ends the reply with "stop"."""
    from tests.decoding.test_core import EvenTokens

    model = serve_models[0]
    prompts = _prompts(model.config.vocab_size, 0, count=3)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eot=False)
    grammar = EvenTokens(5)
    engine = Engine(model)
    outs = [Collector() for _ in prompts]
    engine.submit(prompts[0], params, outs[0], constraint=grammar)
    for prompt, out in zip(prompts[1:], outs[1:]):
        engine.submit(prompt, params, out)
    engine.start()
    assert all(out.done.wait(60) for out in outs)
    engine.shutdown()
    assert outs[0].tokens == grammar.taken and len(outs[0].tokens) == 5
    assert all(t % 2 == 0 for t in outs[0].tokens) and outs[0].finish[1] == "stop"
    assert [o.tokens for o in outs[1:]] == [reference(model, p, params) for p in prompts[1:]]


@pytest.mark.parametrize("length, max_tokens, finish", [(5, 5, "stop"), (6, 5, "length")])
def test_a_grammar_complete_on_the_last_token_ends_with_stop(serve_models, length, max_tokens, finish):
    """A reply whose grammar completes on its max_tokens-th token is whole ("stop"); one cut
    before its grammar completes is not ("length")."""
    from tests.decoding.test_core import EvenTokens

    model = serve_models[0]
    engine = Engine(model).start()
    out = Collector()
    engine.submit(_prompts(model.config.vocab_size, 1, count=1)[0],
                  SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_at_eot=False), out,
                  constraint=EvenTokens(length))
    assert out.done.wait(60)
    engine.shutdown()
    assert len(out.tokens) == max_tokens and out.finish[1] == finish
