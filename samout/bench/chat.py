"""Per-turn cost of a chat: time to first token of turn k, state carried vs history re-prefilled.

    samout bench chat [--run RUN_DIR] [--turns 20] [--message-tokens 64] [--reply-tokens 32]

`Conversation` (what `samout chat` runs) feeds each turn's new message on top of the state;
the baseline does what a model without a cache must: run the whole rendered history again
from an empty state every turn, then sample. Time to first token = from the turn's start to
its first sampled token (median over --repeats conversations). Without --run, a random
SamOut with the `small` preset's width (a chat tokenizer trained on the fly) is measured:
speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from samout.bench.common import header_line, run_header, write_json
from samout.chat.conversation import Conversation
from samout.chat.template import load_chat_template, render_ids
from samout.decoding.sampler import RowSampler, sample_one


def _random_run(hidden: int, layers: int, heads: int):
    import random

    from samout import SamOut, SamOutConfig
    from samout.chat.tasks import make_task
    from samout.tokenizer import train_tokenizer

    rng = random.Random(0)
    tokenizer = train_tokenizer([make_task(rng)[0] for _ in range(2000)], 1024, chat=True)
    torch.manual_seed(0)
    model = SamOut(SamOutConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_layers=layers,
                                num_heads=heads)).eval()
    return model, tokenizer, load_chat_template("")


def _message(tokenizer, n: int, turn: int) -> str:
    words = [f"w{(turn * 131 + i * 17) % 97}" for i in range(n)]
    text = " ".join(words)
    while len(tokenizer.encode(text).ids) > n:
        text = text.rsplit(" ", 1)[0]
    return text


@torch.no_grad()
def run_bench(model, tokenizer, template: str, turns: int, message_tokens: int, reply_tokens: int,
              repeats: int) -> dict:
    carried = [[] for _ in range(turns)]
    prefill = [[] for _ in range(turns)]
    history_tokens = [0] * turns
    warm = Conversation(model, tokenizer, template, temperature=0, max_new_tokens=reply_tokens)
    for k in range(3):  # warm-up: first calls allocate and pick kernels
        list(warm.send_ids(_message(tokenizer, message_tokens, k)))
        model(torch.tensor([[1] * (message_tokens * (k + 1))]))
    for _ in range(repeats):
        chat = Conversation(model, tokenizer, template, temperature=0, max_new_tokens=reply_tokens)
        messages = []
        for k in range(turns):
            text = _message(tokenizer, message_tokens, k)
            # Baseline: the whole history + the new message, from an empty state.
            t0 = time.perf_counter()
            ids = render_ids(tokenizer, messages + [{"role": "user", "content": text}], True, template)
            logits, _ = model(torch.tensor([ids]))
            sample_one(logits[0, -1], RowSampler(chat.params, prompt=ids))
            prefill[k].append(time.perf_counter() - t0)
            history_tokens[k] = len(ids)
            # samout chat: the new message only, on top of the state.
            t0 = time.perf_counter()
            stream = chat.send_ids(text)
            next(stream, None)
            carried[k].append(time.perf_counter() - t0)
            for _ in stream:  # finish the reply (its tokens enter the state)
                pass
            # A fixed-length reply keeps both sides' histories the same size.
            messages += [{"role": "user", "content": text}, chat.transcript[-1]]
    med = [sorted(v)[len(v) // 2] for v in carried]
    base = [sorted(v)[len(v) // 2] for v in prefill]
    return {"turns": turns, "message_tokens": message_tokens, "reply_tokens": reply_tokens,
            "repeats": repeats, "ttft_state_s": med, "ttft_reprefill_s": base,
            "history_tokens": history_tokens,
            "state_ratio_last_vs_first": med[-1] / med[0],
            "reprefill_ratio_last_vs_first": base[-1] / base[0]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `samout bench chat` (and of `python -m samout.bench.chat`)."""
    p.add_argument("--run", metavar="RUN_DIR", help="a chat run directory (default: a random small model)")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--message-tokens", type=int, default=64)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the result here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m samout.bench.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv), "python -m samout.bench.chat " + shlex.join(argv or sys.argv[1:]))


def run(args: argparse.Namespace, command: str | None = None) -> int:
    command = command or "samout bench chat " + shlex.join(sys.argv[3:])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        chat = Conversation.load_run(args.run)
        model, tokenizer, template = chat.model, chat.tokenizer, chat.template
    else:
        model, tokenizer, template = _random_run(args.hidden_size, args.num_layers, args.num_heads)
    # Forced replies of exactly --reply-tokens tokens: never stop at <|end|> early.
    end = tokenizer.token_to_id("<|end|>")
    if not args.run:
        with torch.no_grad():
            model.head.weight[end].fill_(-1e4)
    header = run_header(torch.device("cpu"), command)
    result = {**header, **run_bench(model, tokenizer, template, args.turns, args.message_tokens,
                                    args.reply_tokens, args.repeats)}
    print(header_line(header))
    print(f"{'turn':>4} {'history tokens':>15} {'state TTFT ms':>14} {'re-prefill TTFT ms':>19}")
    for k in range(args.turns):
        print(f"{k + 1:>4} {result['history_tokens'][k]:>15} {1e3 * result['ttft_state_s'][k]:>14.2f} "
              f"{1e3 * result['ttft_reprefill_s'][k]:>19.2f}")
    print(f"turn {args.turns} / turn 1: state {result['state_ratio_last_vs_first']:.2f}x, "
          f"re-prefill {result['reprefill_ratio_last_vs_first']:.2f}x")
    if args.json:
        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
