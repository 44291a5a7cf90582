"""Log-probabilities of tokens, generated and prompt ones.

They are those of the model's RAW distribution: log-softmax of its logits, before logit bias,
penalties, temperature, top-k/top-p/min-p or a grammar mask (vLLM's default,
`logprobs_mode="raw_logprobs"`). So a token's logprob does not depend on how it was sampled,
greedy and sampled runs report the same numbers, and a scoring call (echo) gives the model's
own likelihood, what lm-eval's loglikelihood needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class TokenLogprob(NamedTuple):
    token: int
    logprob: float | None  # None: the prompt's first token (nothing before it to score it)
    top: list[tuple[int, float]]  # the `n` most likely tokens (id, logprob), most likely first


def token_logprobs(logits: Tensor, tokens: Sequence[int], top_n: Sequence[int]) -> list[TokenLogprob]:
    """Row i of `logits` [n, V] scored at `tokens[i]`, with its `top_n[i]` most likely tokens."""
    if not len(tokens):
        return []
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, torch.tensor(list(tokens), dtype=torch.long).unsqueeze(-1))[:, 0].tolist()
    k = max(top_n)
    if k > 0:
        values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
    out = []
    for i, token in enumerate(tokens):
        n = top_n[i]
        top = list(zip(ids[i][:n], values[i][:n])) if n > 0 else []
        out.append(TokenLogprob(int(token), picked[i], top))
    return out


def token_logprob_ref(row: Tensor, token: int, n: int) -> TokenLogprob:
    """One [V] row, the obvious way (for tests)."""
    logp = torch.log_softmax(row.float(), -1)
    order = torch.argsort(logp, descending=True, stable=True)[:n].tolist()
    return TokenLogprob(token, float(logp[token]), [(t, float(logp[t])) for t in order])
