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

from samout.chat.conversation import Conversation
from samout.chat.template import encode_rendered, last_turn_mask, render_text
from samout.data.chat import read_jsonl, segment_batch
from samout.training.objectives import sequence_logps


@torch.no_grad()
def exact_match(model, tokenizer, template: str, conversations: list[list[dict[str, str]]],
                max_new_tokens: int = 16) -> dict[str, float]:
    chat = Conversation(model, tokenizer, template, temperature=0, max_new_tokens=max_new_tokens)
    right = ended = 0
    by_turn = {True: [0, 0], False: [0, 0]}  # first turn?: [right, total]
    for messages in conversations:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        chat.reset(system=system or "")
        turns = [m for m in messages if m["role"] != "system"]
        for i in range(0, len(turns) - 2, 2):  # the history: fed as it is, answers included
            _feed_exchange(chat, turns[i]["content"], turns[i + 1]["content"])
        reply = chat.reply(turns[-2]["content"])
        ok = reply.strip() == turns[-1]["content"].strip()
        right += ok
        ended += chat.last_ended
        by_turn[len(turns) == 2][0] += ok
        by_turn[len(turns) == 2][1] += 1
    n = max(len(conversations), 1)
    return {"exact_match": right / n, "end_of_turn": ended / n, "examples": len(conversations),
            "exact_match_first_turn": by_turn[True][0] / max(by_turn[True][1], 1),
            "exact_match_later_turn": by_turn[False][0] / max(by_turn[False][1], 1)}


def _feed_exchange(chat: Conversation, user: str, assistant: str) -> None:
    """Put a past exchange into the state (the reference answer, not a sampled one)."""
    ids = chat.turn_ids(user)
    text = render_text([{"role": "assistant", "content": assistant}], chat.template)
    from samout.tokenizer import ASSISTANT_TOKEN, EOT_TOKEN

    answer = encode_rendered(chat.tokenizer, text[len(EOT_TOKEN) + len(ASSISTANT_TOKEN):])
    chat._feed(ids + answer)
    chat.transcript += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


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
