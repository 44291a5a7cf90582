"""The serving engine: one background thread decodes every active request together
(continuous batching), in the shape of vLLM's engine loop.

Each iteration of the loop:
  1. drops cancelled requests (a client that went away frees its slot at once);
  2. admits waiting requests up to `max_batch` active ones, resuming each from the
     longest cached prefix of its prompt (`StateCache`, or a `TieredStateCache` with a
     disk or Redis store behind it: its I/O runs here, on the engine's thread, never on
     the server's event loop) when there is one (states are saved when a prompt is in and
     when a request leaves);
  3. feeds at most `prefill_chunk` prompt tokens of newcomers (chunked prefill, so a long
     prompt never stalls the sequences that are already decoding for more than one chunk),
     chunks of equal length whose states stack in one batched call;
  4. samples the next token of every sequence whose prompt is in, in one call of the
     decoding core (samout.decoding.sampler: per-row settings, penalties, grammar masks; each
     request has its own `torch.Generator`, so seeded sampling gives the same tokens batched
     or alone), and feeds all the new tokens in ONE batched one-token model call.

How states go into one batched step is the model's business (`model.state_batch`, a
`samout.state.StateBatch`): SamOut's fixed-size states are concatenated along the batch
and split back; a Transformer's KV caches, whose lengths differ per sequence, are
left-padded to the longest and called with per-row lengths. Sequences whose states cannot
share a batch (the batch's `key` differs) step in separate calls. While the set of
sequences in a batch stays the same, the next step reuses that batch as it is (no
re-stacking, no re-padding); it is rebuilt only when a sequence joins or leaves.
`batched_decode=False` steps every sequence alone: the plain reference path.

Requests talk to the engine through `emit(event)` callbacks, called on the engine thread, or,
with `deliver` set (the HTTP server sets it), handed over as one list per loop iteration:
`deliver([(emit, event), ...])` (one wake-up of the server's event loop per step, not one per
token per client):
  ("admitted", cached_tokens)        the request got a slot (resuming after cached_tokens)
  ("prompt_logprobs", [lp, ...])     the prompt's tokens' `TokenLogprob`s (the first's logprob None),
                                     before any token, when the request asked (`prompt_logprobs`)
  ("token", id)                      a new token; ("token", id, logprob) when the request's
                                     params ask for logprobs (a `TokenLogprob`)
  ("stop_token", id, logprob)        the stop token that ended the reply (not part of it), only
                                     when the request asked for logprobs
  ("finish", reason, usage)          reason "stop" (end of text) or "length"; usage counts
  ("error", message)                 the model call failed (the engine keeps running)

`on_idle()` runs on the engine thread when it has been without work for `idle_seconds` after
some work: the server returns the freed heap to the OS there, so that after a burst of load
its memory falls back to the model and the cached states.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from samout.decoding.constraint import TokenConstraint
from samout.decoding.logprobs import TokenLogprob, token_logprobs
from samout.decoding.params import SamplingParams
from samout.decoding.sampler import RowSampler, sample
from samout.errors import SamoutError
from samout.serve.state_cache import StateCache
from samout.serve.state_store import TieredStateCache
from samout.state import State, StateBatch
from samout.tokenizer import EOT_ID

assert array("i").itemsize == 4, "token ids are kept as array('i') of int32"

DEFAULT_MAX_BATCH = 64
Emit = Callable[[tuple], None]
DEFAULT_MAX_QUEUE = 256
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_IDLE_SECONDS = 1.0


class QueueFullError(SamoutError):
    """The engine's waiting queue is full: the caller should answer 429."""


class EngineStoppedError(SamoutError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)
class GenerationRequest:
    prompt: np.ndarray  # int32 ids (4 bytes a token: a Python list of ints takes 36)
    params: SamplingParams
    emit: Callable[[tuple], None]
    stop_ids: frozenset[int] = frozenset({EOT_ID})  # end of text (and e.g. <|end|> for chat)
    constraint: TokenConstraint | None = None  # a grammar (structured output)
    # The prompt's tokens' logprobs with this many top tokens (echo); None: not asked. Such a
    # request is prefilled with every position's logits, and never from the state cache.
    prompt_logprobs: int | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    sampler: RowSampler
    pending: np.ndarray  # prompt tokens not yet fed (a view of the prompt)
    fed: array  # int32 ids the state has seen (array("i"): 4 bytes a token, appends in place)
    state: State | None = None
    logits: Tensor | None = None  # [vocab] next-token logits after `fed`
    generated: int = 0
    cached_tokens: int = 0
    prompt_lps: list | None = None  # the prompt's TokenLogprobs so far (prompt_logprobs asked)


@dataclass(eq=False)
class _Batch:
    """A batched decode step's sequences (in row order) and their batched state, kept for
    the next step while the same sequences go on together."""

    seqs: list[_Sequence]
    states: StateBatch


class Engine:
    """Continuous batching over one model. `submit` from any thread; `start` runs the loop."""

    def __init__(self, model: nn.Module, *, max_batch: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 cache: StateCache | TieredStateCache | None = None, name: str = "model",
                 batched_decode: bool = True,
                 deliver: Callable[[list[tuple[Emit, tuple]]], None] | None = None,
                 on_idle: Callable[[], None] | None = None,
                 idle_seconds: float = DEFAULT_IDLE_SECONDS) -> None:
        for label, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise SamoutError(f"{label} must be at least 1, got {value}")
        if max_queue < 0:
            raise SamoutError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        self.batched = batched_decode
        # A model whose states do not simply stack names its own batching (samout.state).
        self.state_batch: type[StateBatch] = getattr(model, "state_batch", StateBatch)
        self._batches: list[_Batch] = []  # the last decode step's
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.cache = cache
        self._waiting: deque[GenerationRequest] = deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.deliver = deliver
        # Called on the engine thread once the engine has had nothing to do for
        # `idle_seconds` after some work (the server hands freed memory back to the OS then).
        self.on_idle, self.idle_seconds = on_idle, idle_seconds
        self._outbox: list[tuple[Emit, tuple]] = []
        self.steps = self.tokens_generated = self.peak_active = 0
        self.state_bytes = self.peak_state_bytes = self.peak_state_sessions = 0

    # -- public API ------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"samout-engine-{self.name}", daemon=True)
            self._thread.start()
        return self

    def submit(self, prompt: list[int] | np.ndarray, params: SamplingParams, emit: Callable[[tuple], None],
               stop_ids: frozenset[int] = frozenset({EOT_ID}), *, constraint: TokenConstraint | None = None,
               prompt_logprobs: int | None = None) -> GenerationRequest:
        if len(prompt) == 0:
            raise SamoutError("the prompt is empty (it must hold at least one token)")
        # Held compactly for the request's life: with a Python list, a long history's ids
        # were most of what a session cost the server beyond its state.
        ids = np.array(prompt, dtype=np.int32)
        request = GenerationRequest(ids, params, emit, frozenset(stop_ids), constraint, prompt_logprobs)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            free_slots = self.max_batch - len(self._active)
            if len(self._waiting) >= self.max_queue + max(free_slots, 0):
                raise QueueFullError(f"too many requests: {len(self._active)} running and "
                                     f"{len(self._waiting)} waiting")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def abort(self, request: GenerationRequest) -> None:
        """Cancel a request (its client went away); its slot is freed before the next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the running and waiting ones first."""
        with self._cond:
            self._stopping = True
            if not drain:
                for request in self._waiting:
                    request.cancelled = True
                for seq in self._active:
                    seq.request.cancelled = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.cache is not None:  # a persistent tier writes what is pending (state_store.py)
            self.cache.close()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests now, without the lock: a scrape must never wait on a step."""
        return len(self._active), len(self._waiting)

    def stats(self, reset_peaks: bool = False) -> dict:
        """Counters; `reset_peaks` starts the peak figures afresh after reading them (benchmarks)."""
        with self._cond:
            stats = {"active": len(self._active), "waiting": len(self._waiting), "steps": self.steps,
                    "tokens_generated": self.tokens_generated, "peak_active": self.peak_active,
                    "state_bytes": self.state_bytes, "peak_state_bytes": self.peak_state_bytes,
                     "peak_state_sessions": self.peak_state_sessions,
                    "batched_decode": self.batched, "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "cache": self.cache.stats() if self.cache is not None else None}
            if reset_peaks:
                self.peak_active, self.peak_state_bytes = len(self._active), self.state_bytes
                self.peak_state_sessions = sum(s.state is not None for s in self._active)
            return stats

    # -- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        worked = False  # since the last `on_idle` call
        while True:
            with self._cond:
                went_idle = False
                while not self._stopping and not self._waiting and not self._active:
                    if not (worked and self.on_idle is not None):
                        self._cond.wait()
                    elif not self._cond.wait(self.idle_seconds) and not (self._waiting or self._active):
                        went_idle = True  # a whole `idle_seconds` without work
                        break
                if self._stopping and not self._waiting and not self._active:
                    return
            if went_idle:  # outside the lock: a submit meanwhile waits for nothing but this
                worked = False
                try:
                    self.on_idle()
                except Exception as err:
                    print(f"samout serve: on_idle failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            worked = True
            try:
                self._iteration()
            except Exception as err:  # never let one bad batch kill the server
                self._batches = []
                print(f"samout serve: engine error: {type(err).__name__}: {err}", file=sys.stderr)
                for seq in list(self._active):
                    self._fail(seq, f"generation failed: {type(err).__name__}")
            self._flush()

    def _flush(self) -> None:
        """Hand this iteration's events to `deliver` in one call."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self.deliver(batch)
        except Exception:  # the receiver is gone (e.g. its event loop closed)
            for emit, _ in batch:
                for seq in self._active:
                    if seq.request.emit is emit:
                        seq.request.cancelled = True

    @torch.no_grad()
    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        self.steps += 1
        self.state_bytes, sessions = self._live_state_bytes()
        if self.state_bytes > self.peak_state_bytes:
            self.peak_state_bytes, self.peak_state_sessions = self.state_bytes, sessions

    def _live_state_bytes(self) -> tuple[int, int]:
        """(bytes the live sequences' states hold, how many sequences hold one). The rows of
        a batch kept from the last step count as the batch (a Transformer's with its
        padding): that is what they occupy."""
        in_batch = {id(s) for b in self._batches for s in b.seqs}
        live = [s for s in self._active if s.state is not None]
        total = sum(s.state.nbytes for s in live if id(s) not in in_batch)
        total += sum(b.states.nbytes for b in self._batches)
        return total, len(live)

    def _drop_cancelled(self) -> None:
        with self._cond:
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for seq in [s for s in self._active if s.request.cancelled]:
            self._remove(seq)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or len(self._active) >= self.max_batch:
                    break
                request = self._waiting.popleft()
            params = request.params
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            # A cached prefix has no logits: prompt logprobs need the whole prompt run.
            scoring = request.prompt_logprobs is not None
            entry = self.cache.lookup(request.prompt) if self.cache is not None and not scoring else None
            cached = 0 if entry is None else entry.length
            fed = array("i", request.prompt[:cached].tobytes())
            sampler = RowSampler(params, prompt=request.prompt, stop_ids=request.stop_ids,
                                 generator=torch.Generator(device="cpu").manual_seed(seed),
                                 constraint=request.constraint)
            seq = _Sequence(request, sampler, pending=request.prompt[cached:], fed=fed,
                            prompt_lps=[] if scoring else None)
            if entry is not None:
                seq.state, seq.cached_tokens = entry.state, cached
            self._active.append(seq)
            self._emit(seq, ("admitted", seq.cached_tokens))
            self.peak_active = max(self.peak_active, len(self._active))

    def _prefill(self) -> None:
        """Feed at most `prefill_chunk` prompt tokens of the sequences still reading their
        prompts, in order of arrival. Chunks of the same length whose states stack (none
        yet, or states of equal shapes) go into one batched call: 32 follow-up turns of 16
        tokens are one [32, 16] call, not 32 calls of [1, 16]."""
        budget = self.prefill_chunk
        chunks: list[tuple[_Sequence, np.ndarray]] = []
        for seq in self._active:
            if budget <= 0:
                break
            if len(seq.pending) == 0:
                continue
            chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
            budget -= len(chunk)
            chunks.append((seq, chunk))
        groups: dict[tuple, list[tuple[_Sequence, np.ndarray]]] = {}
        for seq, chunk in chunks:
            shapes = None if seq.state is None else seq.state.shapes()
            groups.setdefault((len(chunk), shapes, seq.prompt_lps is not None), []).append((seq, chunk))
        for group in groups.values():
            self._prefill_group(group)

    def _prefill_group(self, group: list[tuple[_Sequence, np.ndarray]]) -> None:
        seqs = [seq for seq, _ in group]
        ids = torch.from_numpy(np.stack([chunk for _, chunk in group]).astype(np.int64)).to(self.device)
        state = None if seqs[0].state is None else State.stack([seq.state for seq in seqs])
        scoring = seqs[0].prompt_lps is not None  # every position's logits (prompt logprobs)
        try:
            logits, state = self.model(ids, state, logits_to_keep=0 if scoring else 1)
        except Exception as err:
            if len(group) > 1:  # one at a time, so that only a request that fails alone fails
                for one in group:
                    self._prefill_group([one])
                return
            self._fail(seqs[0], f"prefill failed: {err}")
            return
        parts = state.split()
        for i, (seq, chunk) in enumerate(group):
            if scoring:
                self._score_prompt(seq, chunk, logits[i])
            seq.state, seq.logits = parts[i], logits[i, -1]
            seq.fed.frombytes(chunk.tobytes())
            if len(seq.pending) == 0 and self.cache is not None:
                # The prompt's own state too: a follow-up whose history re-encodes the reply
                # differently (or regenerates it) still resumes after this prompt.
                self.cache.put(seq.fed, seq.state)

    def _score_prompt(self, seq: _Sequence, chunk: np.ndarray, logits: Tensor) -> None:
        """The logprobs of a prompt chunk's tokens: the first from the logits before the chunk
        (None at the prompt's start), the others from the chunk's own positions."""
        n = seq.request.prompt_logprobs
        rows = logits[:-1].float().cpu()
        if seq.logits is not None:
            rows = torch.cat([seq.logits.float().cpu().unsqueeze(0), rows])
        elif not seq.prompt_lps:  # the prompt's first token: nothing to score it with
            seq.prompt_lps.append(TokenLogprob(int(chunk[0]), None, []))
        targets = chunk.tolist()[len(chunk) - rows.shape[0]:]
        seq.prompt_lps.extend(token_logprobs(rows, targets, [n] * len(targets)))
        if len(seq.pending) == 0:
            self._emit(seq, ("prompt_logprobs", seq.prompt_lps))
            seq.prompt_lps = None

    def _decode(self) -> None:
        ready = [s for s in self._active if len(s.pending) == 0 and s.logits is not None]
        if not ready:
            return
        all_logits = torch.stack([s.logits for s in ready]).float().cpu()
        for seq, row in zip(ready, all_logits):
            seq.logits = row  # so the last step's logits (one row per session) are freed now
        live = [i for i, seq in enumerate(ready) if seq.generated < seq.request.params.max_new_tokens]
        for i in sorted(set(range(len(ready))) - set(live)):
            self._finish(ready[i], "length")
        feed: list[tuple[_Sequence, int]] = []
        if live:
            rows = all_logits if len(live) == len(ready) else all_logits[torch.tensor(live)]
            # One call of the decoding core for the batch (a plain greedy batch: one argmax).
            tokens, logprobs = sample(rows, [ready[i].sampler for i in live])
            for j, i in enumerate(live):
                seq, token = ready[i], tokens[j]
                logprob = None if logprobs is None else logprobs[j]
                if seq.sampler.is_stop(token):
                    if logprob is not None:
                        self._emit(seq, ("stop_token", token, logprob))
                    self._finish(seq, "stop")
                    continue
                seq.sampler.accept(token)
                seq.generated += 1
                self.tokens_generated += 1
                self._emit(seq, ("token", token) if logprob is None else ("token", token, logprob))
                if seq.sampler.finished:  # the grammar is complete (on its last token, too)
                    self._finish(seq, "stop")
                elif seq.generated >= seq.request.params.max_new_tokens:  # cut: "length"
                    self._finish(seq, "length")
                elif not seq.request.cancelled:
                    feed.append((seq, token))
        # The rows of the sequences that go on are not needed any more: freed before the
        # model call makes the new ones (peak memory holds one [batch, vocab] at a time).
        for seq, _ in feed:
            seq.logits = None
        del all_logits
        if not feed:
            return
        if not self.batched:
            self._batches = []
            for seq, token in feed:
                self._step_alone(seq, token)
            return
        groups: dict = {}
        for seq, token in feed:
            groups.setdefault(self.state_batch.key(seq.state), []).append((seq, token))
        last, self._batches = self._batches, []
        for group in groups.values():
            self._step_batched(group, last)

    def _step_alone(self, seq: _Sequence, token: int) -> None:
        """One token for one sequence: the plain model call."""
        tokens = torch.tensor([[token]], device=self.device)
        try:
            logits, state = self.model(tokens, seq.state)
        except Exception as err:
            self._fail(seq, f"decode failed: {err}")
            return
        seq.state, seq.logits = state, logits[0, -1]
        seq.fed.append(token)

    def _step_batched(self, feed: list[tuple[_Sequence, int]], last: list[_Batch]) -> None:
        """One token for every sequence in `feed` in one model call, on the batch of the last
        step when it held exactly these sequences."""
        seqs = [s for s, _ in feed]
        batch = next((b.states for b in last if _same(b.seqs, seqs)), None)
        if batch is None:
            batch = self.state_batch([s.state for s in seqs])
        tokens = torch.tensor([[t] for _, t in feed], device=self.device)
        try:
            logits, state = self.model(tokens, batch.state, **batch.model_kwargs())
        except Exception as err:
            for seq in seqs:
                self._fail(seq, f"decode failed: {err}")
            return
        batch.advance(state, 1)
        for i, ((seq, token), row) in enumerate(zip(feed, batch.rows())):
            seq.state, seq.logits = row, logits[i, -1]
            seq.fed.append(token)
        self._batches.append(_Batch(seqs, batch))

    # -- leaving -----------------------------------------------------------------------
    def _usage(self, seq: _Sequence) -> dict:
        return {"prompt_tokens": len(seq.request.prompt), "completion_tokens": seq.generated,
                "cached_tokens": seq.cached_tokens}

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._emit(seq, ("finish", reason, self._usage(seq)))
        self._remove(seq)

    def _fail(self, seq: _Sequence, message: str) -> None:
        self._emit(seq, ("error", message))
        seq.state = None  # nothing trustworthy to cache
        self._remove(seq)

    def _remove(self, seq: _Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
        # A batch that held it is rebuilt without it (and its memory freed).
        self._batches = [b for b in self._batches if not any(s is seq for s in b.seqs)]
        if self.cache is not None and seq.state is not None and len(seq.fed):
            self.cache.put(seq.fed, seq.state)  # the state after exactly `fed`

    def _emit(self, seq: _Sequence, event: tuple) -> None:
        if seq.request.cancelled:
            return
        if self.deliver is not None:
            self._outbox.append((seq.request.emit, event))
            return
        try:
            seq.request.emit(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed)
            seq.request.cancelled = True


def _same(a: list[_Sequence], b: list[_Sequence]) -> bool:
    """The same sequences in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
