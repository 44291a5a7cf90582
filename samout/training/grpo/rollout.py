"""Rollouts: G completions of one prompt, and their per-token log-probabilities.

A prompt is prefilled once (batch 1, no padding) and its state is forked G ways by repeating
every state tensor along the batch: SamOut's few-KiB running max, a Transformer's KV cache.
Prompts are never batched with one another, so a prompt's rollouts are the same tokens and
log-probabilities whatever other prompts share its step (tested), and no pad token ever
enters a state. Rows that finish (a stop token) leave the decoding batch.

The policy whose log-probabilities enter the loss is softmax(logits / temperature) of the
raw model logits (TRL's rule), for the old, the new and the reference model alike; sampling
draws from that same distribution (temperature 0: greedy, for evaluation). This module uses
raw model calls only, so it can move onto samout.decoding later.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samout.state import State
from samout.tokenizer import PAD_ID


def fork_state(state: State, copies: int) -> State:
    """The state of a batch-1 prefill repeated `copies` times along the batch (any model)."""
    return state.map(lambda t: t.repeat_interleave(copies, 0))


def generator_for(*seeds: int) -> torch.Generator:
    """A CPU generator that is a pure function of the seeds (e.g. run seed, step, prompt)."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1)[0]))


def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def sample_group(model, prompt: list[int], num: int, max_new_tokens: int, temperature: float,
                 generator: torch.Generator | None, stop_ids: set[int],
                 autocast_dtype: torch.dtype | None = None) -> list[list[int]]:
    """`num` completions of `prompt` (token ids), each ending with its stop token or cut at
    `max_new_tokens`."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, state = model(torch.tensor([prompt], device=device), logits_to_keep=1)
    last = logits[:, -1].float().expand(num, -1)
    state = fork_state(state, num)
    completions: list[list[int]] = [[] for _ in range(num)]
    active = list(range(num))
    for t in range(max_new_tokens):
        tokens = _pick(last, temperature, generator)
        keep = []
        for j, (row, token) in enumerate(zip(active, tokens.tolist())):
            completions[row].append(token)
            if token not in stop_ids:
                keep.append(j)
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            state, tokens = state.index_select(index), tokens[index]
            active = [active[j] for j in keep]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, state = model(tokens[:, None], state=state)
        last = logits[:, -1].float()
    return completions


def completion_logps(model, prompt: list[int], completions: list[list[int]], temperature: float = 1.0,
                     autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(per-token log-probabilities [G, L], mask [G, L]) of each completion given the prompt:
    one prefill, the state forked G ways, the completions right-padded after their end (a
    causal model never lets a later pad reach an earlier position; the mask drops them).
    Differentiable; run with grad enabled for the same kernels as the update (see objective)."""
    device = next(model.parameters()).device
    num, width = len(completions), max(len(c) for c in completions)
    ids = torch.full((num, width), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros((num, width), dtype=torch.bool, device=device)
    for r, c in enumerate(completions):
        ids[r, :len(c)] = torch.tensor(c, device=device)
        mask[r, :len(c)] = True
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, state = model(torch.tensor([prompt], device=device), logits_to_keep=1)
        parts = [logits[:, -1:].expand(num, -1, -1)]
        if width > 1:
            rest, _ = model(ids[:, :-1], state=fork_state(state, num))
            parts.append(rest)
    logits = torch.cat([p.float() for p in parts], 1)
    if temperature not in (0, 1):
        logits = logits / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask
