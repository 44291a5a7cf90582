"""Checkable chat evaluation: exact-match accuracy, end-of-turn rate, preference accuracy.

    exact match        the greedy reply to a held-out conversation's last user turn (the
                       earlier turns given as history) equals its assistant answer exactly
                       (surrounding whitespace ignored); also split into conversations whose
                       question is the first turn and those where it is a later one
    end-of-turn rate   the fraction of those replies that end with <|end|> before the token limit
    preference acc.    the fraction of held-out DPO pairs whose chosen reply the model gives a
                       higher log-probability than the rejected one (given the prompt)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from samout.chat.template import encode_rendered, last_turn_mask, render_text
from samout.data.chat import read_jsonl, segment_batch
from samout.state import State
from samout.tokenizer import END_OF_TURN_TOKEN, EOT_ID
from samout.training.objectives import sequence_logps


@torch.no_grad()
def exact_match(model, tokenizer, template: str, conversations: list[list[dict[str, str]]],
                max_new_tokens: int = 16, batch_size: int = 64) -> dict[str, float]:
    """Greedy replies, decoded `batch_size` conversations at a time: each prompt is run on its
    own (its state starts empty), then the states are stacked and every step feeds one token
    per conversation. The same tokens as `Conversation` with temperature 0 (tested)."""
    model.eval()
    device = next(model.parameters()).device
    end = tokenizer.token_to_id(END_OF_TURN_TOKEN)
    right = ended = 0
    by_turn = {True: [0, 0], False: [0, 0]}  # first turn?: [right, total]
    for b in range(0, len(conversations), batch_size):
        batch = conversations[b:b + batch_size]
        logits, states = [], []
        for messages in batch:
            ids = encode_rendered(tokenizer, render_text(messages[:-1], template, add_generation_prompt=True))
            out, state = model(torch.tensor([ids], device=device))
            logits.append(out[0, -1])
            states.append(state)
        last = torch.stack(logits)
        state = State.stack(states)
        replies: list[list[int]] = [[] for _ in batch]
        done = [None] * len(batch)  # the token that stopped each reply
        for _ in range(max_new_tokens):
            tokens = last.float().argmax(-1)
            for r, token in enumerate(tokens.tolist()):
                if done[r] is None:
                    if token in (end, EOT_ID):
                        done[r] = token
                    else:
                        replies[r].append(token)
            if all(d is not None for d in done):
                break
            out, state = model(tokens[:, None], state=state)
            last = out[:, -1]
        for messages, reply, stop in zip(batch, replies, done):
            ok = tokenizer.decode(reply, skip_special_tokens=True).strip() == messages[-1]["content"].strip()
            first = sum(m["role"] == "user" for m in messages) == 1
            right += ok
            ended += stop == end
            by_turn[first][0] += ok
            by_turn[first][1] += 1
    n = max(len(conversations), 1)
    return {"exact_match": right / n, "end_of_turn": ended / n, "examples": len(conversations),
            "exact_match_first_turn": by_turn[True][0] / max(by_turn[True][1], 1),
            "exact_match_later_turn": by_turn[False][0] / max(by_turn[False][1], 1)}


@torch.no_grad()
def preference_accuracy(model, tokenizer, template: str, pairs: list[list[list[dict[str, str]]]],
                        batch_size: int = 32) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for i in range(0, len(pairs), batch_size):
        seqs, masks = [], []
        for chosen, rejected in pairs[i:i + batch_size]:
            for messages in (chosen, rejected):
                ids = encode_rendered(tokenizer, render_text(messages, template))
                seqs.append(np.asarray(ids))
                masks.append(np.asarray(last_turn_mask(tokenizer, ids)))
        x, y = segment_batch(seqs, masks)
        logps = sequence_logps(model, x.to(device), y.to(device))
        wins += int((logps[0::2] > logps[1::2]).sum())
    return {"preference_accuracy": wins / max(len(pairs), 1), "pairs": len(pairs)}


def evaluate_chat(model, tokenizer, template: str, sft_file: str | Path | None = None,
                  dpo_file: str | Path | None = None, limit: int | None = None,
                  max_new_tokens: int = 16) -> dict[str, float]:
    result: dict[str, float] = {}
    if sft_file is not None:
        convs = [ex.sequences[0] for ex in read_jsonl(Path(sft_file), "chat")][:limit]
        result.update(exact_match(model, tokenizer, template, convs, max_new_tokens))
    if dpo_file is not None:
        pairs = [ex.sequences for ex in read_jsonl(Path(dpo_file), "dpo")][:limit]
        result.update(preference_accuracy(model, tokenizer, template, pairs))
    return result
