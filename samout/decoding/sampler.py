"""The seeded sampler: the next token of every row of a batch, each row with its own settings
and its own `torch.Generator` (so a seeded row gives the same tokens alone or in any batch).

    rows = [RowSampler(params, prompt=ids, stop_ids=end_ids(tokenizer)) ...]
    tokens, logprobs = sample(logits, rows)      # logits: float32 [len(rows), vocab], CPU
    for row, token in zip(rows, tokens):
        if row.is_stop(token): ...               # end of text: the reply ends before it
        row.accept(token)                        # history, penalty counts, grammar
        if row.finished: ...                     # the grammar is complete

A batch whose rows all use the defaults (no penalties, bias, min_tokens or grammar) costs one
argmax for its greedy rows, and for its sampled rows one softmax over the rows and one draw
each; nothing else.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from samout.decoding import processors as P
from samout.decoding.constraint import TokenConstraint, bitmask_words
from samout.decoding.logprobs import TokenLogprob, token_logprobs
from samout.decoding.params import SamplingParams
from samout.tokenizer import EOT_ID


class RowSampler:
    """The decoding state of one sequence: its settings, generator, what the penalties count,
    and its token constraint (a grammar), if any."""

    __slots__ = ("params", "stop_ids", "generator", "constraint", "generated", "history", "counts", "plain",
                 "_stop_list")

    def __init__(self, params: SamplingParams, *, prompt: Iterable[int] = (),
                 stop_ids: Iterable[int] = frozenset({EOT_ID}), generator: torch.Generator | None = None,
                 constraint: TokenConstraint | None = None) -> None:
        self.params = params
        self.stop_ids = frozenset(stop_ids)
        self._stop_list = sorted(self.stop_ids)
        if generator is None and params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        self.generator = generator  # None: torch's global generator
        self.constraint = constraint
        self.generated = 0
        # What the repetition penalty looks at: the prompt and the reply (int32).
        self.history: array | None = None
        if params.repetition_penalty != 1.0:
            self.history = array("i", np.asarray(prompt, dtype=np.int32).tobytes())
        counting = params.presence_penalty or params.frequency_penalty
        self.counts: dict[int, int] | None = {} if counting else None
        self.plain = not params.penalised and constraint is None

    def is_stop(self, token: int) -> bool:
        """Whether `token` ends the reply (it is not part of it)."""
        return self.params.stop_at_eot and token in self.stop_ids

    def accept(self, token: int) -> None:
        """`token` is the reply's next token."""
        self.generated += 1
        if self.history is not None:
            self.history.append(token)
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.constraint is not None:
            self.constraint.advance(token)

    @property
    def finished(self) -> bool:
        """The constraint (grammar) is complete: the reply ends here (finish reason "stop")."""
        return self.constraint is not None and self.constraint.is_finished()

    def seen(self) -> Tensor:
        """The ids the repetition penalty applies to (int64): the last `repetition_window`."""
        ids = np.frombuffer(self.history, dtype=np.int32)
        window = self.params.repetition_window
        if window is not None:
            ids = ids[-window:]
        return torch.from_numpy(ids.astype(np.int64))


def process(logits: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """The logits after what comes before temperature (grammar mask, logit bias, min_tokens,
    penalties): `logits` itself when every row is plain, else a processed copy."""
    special = [i for i, r in enumerate(rows) if not r.plain]
    if not special:
        return logits
    x = logits.clone()
    constrained = [i for i in special if rows[i].constraint is not None]
    if constrained:
        bitmask = torch.full((x.shape[0], bitmask_words(x.shape[-1])), -1, dtype=torch.int32)
        for i in constrained:
            rows[i].constraint.fill_bitmask(bitmask, i)
        P.apply_bitmask(x, constrained, bitmask)
    biased = [i for i in special if rows[i].params.logit_bias]
    P.apply_logit_bias(x, biased, [rows[i].params.logit_bias for i in biased])
    early = [i for i in special if rows[i].generated < rows[i].params.min_tokens]
    if constrained and early:
        # A grammar that allows nothing but an end token has the last word: masking it
        # too would leave no token at all (and the grammar would refuse the fallback).
        early = [i for i in early if rows[i].constraint is None or _allows_more(x[i], rows[i]._stop_list)]
    P.apply_mask(x, early, [rows[i]._stop_list for i in early])
    repeat = [i for i in special if rows[i].history is not None]
    P.apply_repetition_penalty(x, repeat, [rows[i].seen() for i in repeat],
                               [rows[i].params.repetition_penalty for i in repeat])
    counted = [i for i in special if rows[i].counts]
    P.apply_presence_frequency(x, counted, [rows[i].counts for i in counted],
                               [rows[i].params.presence_penalty for i in counted],
                               [rows[i].params.frequency_penalty for i in counted])
    return x


def _allows_more(logits: Tensor, stop_ids: list[int]) -> bool:
    """Whether a token other than `stop_ids` has a finite logit (is allowed)."""
    finite = torch.isfinite(logits)
    finite[torch.tensor(stop_ids, dtype=torch.long)] = False
    return bool(finite.any())


def sample(logits: Tensor, rows: Sequence[RowSampler],
           greedy_hint: list[int] | None = None) -> tuple[list[int], list[TokenLogprob | None] | None]:
    """The next token of each row of `logits` (float32 [B, V], CPU), and, when a row's params ask
    for logprobs, its `TokenLogprob` (None for the others; the list is None when none asks).
    `greedy_hint`: the argmax of `logits` per row, when the caller has it already."""
    x = process(logits, rows)
    tokens: list[int] = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0]
    if greedy:
        best = greedy_hint if (greedy_hint is not None and x is logits) else x.argmax(-1).tolist()
        for i in greedy:
            tokens[i] = best[i]
    sampled = [i for i, r in enumerate(rows) if r.params.temperature != 0]
    if sampled:
        sub = x.clone() if len(sampled) == len(rows) else x[torch.tensor(sampled)]
        params = [rows[i].params for i in sampled]
        P.apply_temperature(sub, [p.temperature for p in params])
        P.apply_top_k(sub, [p.top_k for p in params])
        P.apply_top_p(sub, [p.top_p for p in params])
        P.apply_min_p(sub, [p.min_p for p in params])
        probs = torch.softmax(sub, -1)
        ok = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
        for j, i in enumerate(sampled):
            if ok[j]:
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
            else:  # degenerate logits (e.g. all -inf): the most likely token
                tokens[i] = int(torch.argmax(x[i]))
    asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not asking:
        return tokens, None
    found = token_logprobs(logits[torch.tensor(asking)], [tokens[i] for i in asking],
                           [rows[i].params.logprobs for i in asking])
    out: list[TokenLogprob | None] = [None] * len(rows)
    for i, lp in zip(asking, found):
        out[i] = lp
    return tokens, out


def sample_one(logits: Tensor, row: RowSampler) -> tuple[int, TokenLogprob | None]:
    """`sample` for one row: logits [V]."""
    tokens, lps = sample(logits.float().unsqueeze(0), [row])
    return tokens[0], None if lps is None else lps[0]
