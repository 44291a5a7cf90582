"""GRPO rollouts: G completions of one prompt, SamOut (state forked G ways) vs the matched
Transformer (KV cache copied G ways): tokens/s and peak memory.

    samout bench rollout [--preset small] [--num-generations 8] [--tokens 128] [--prompt-tokens 64]

Both run `samout.training.grpo.rollout.sample_group`, what `samout train --objective grpo`
runs: one prefill of the prompt, its state repeated G times along the batch, then G rows
decoded one token per step (sampled at temperature 1, never stopping early, so every row
makes exactly --tokens tokens). SamOut's forked state is G copies of a fixed few KiB; the
Transformer's is G copies of the prompt's KV cache, which grows with every token. Random
weights: speed does not depend on them. Timings are medians over --repeats, the models
interleaved; memory is the peak of tensors allocated during one rollout.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from samout.bench.common import (
    build_model,
    header_line,
    measure_interleaved,
    median,
    model_specs,
    peak_allocated_bytes,
    resolve_device,
    run_header,
    write_json,
)
from samout.config import SamOutConfig
from samout.training.grpo.rollout import fork_state, generator_for, sample_group


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `samout bench rollout`."""
    p.add_argument("--preset", default="small", help="SamOut preset (the Transformer is matched to it)")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions of the prompt")
    p.add_argument("--tokens", type=int, default=128, help="tokens sampled per completion")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the result here")


def measure(preset: str, num: int, tokens: int, prompt_tokens: int, repeats: int,
            device: torch.device) -> dict:
    base = SamOutConfig.from_preset(preset)
    specs = model_specs(base, [base.mixer], base.mixer,
                        max_position_embeddings=max(4096, prompt_tokens + tokens + 1))
    torch.manual_seed(0)
    prompt = torch.randint(2, base.vocab_size, (prompt_tokens,)).tolist()
    models, steps, results = {}, {}, {}
    for name, config in specs.items():
        model = build_model(config, device).eval()
        models[name] = model

        def rollout(model=model):
            return sample_group(model, prompt, num, tokens, 1.0, generator_for(0), set())

        rollout()  # warm-up
        steps[name] = rollout
    seconds = measure_interleaved(steps, repeats, device)
    for name, model in models.items():
        with torch.no_grad():
            _, state = model(torch.tensor([prompt], device=device))
            forked = fork_state(state, num)
            ids = torch.zeros((num, 1), dtype=torch.long, device=device)
            for _ in range(tokens):  # the state after the rollout (a KV cache grows)
                _, forked = model(ids, state=forked)
        took = median(seconds[name])
        results[name] = {"parameters": model.num_parameters(), "seconds": took,
                         "tokens_per_s": num * tokens / took,
                         "peak_bytes": peak_allocated_bytes(steps[name], device),
                         "prompt_state_bytes": state.nbytes,
                         "forked_state_bytes": fork_state(state, num).nbytes,
                         "final_state_bytes": forked.nbytes}
    return {"preset": preset, "num_generations": num, "tokens": tokens, "prompt_tokens": prompt_tokens,
            "repeats": repeats, "models": results}


def run(args: argparse.Namespace, command: str | None = None) -> int:
    command = command or "samout bench rollout " + shlex.join(sys.argv[3:])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    header = run_header(device, command)
    result = {**header, **measure(args.preset, args.num_generations, args.tokens, args.prompt_tokens,
                                  args.repeats, device)}
    print(header_line(header))
    print(f"G={args.num_generations} rollouts of {args.tokens} tokens from one {args.prompt_tokens}-token "
          "prompt")
    print(f"{'model':<16} {'params':>10} {'tokens/s':>10} {'peak MiB':>9} {'forked state KiB':>17} "
          f"{'state after KiB':>16}")
    for name, r in result["models"].items():
        print(f"{name:<16} {r['parameters']:>10,} {r['tokens_per_s']:>10,.0f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['forked_state_bytes'] / 1024:>17.1f} "
              f"{r['final_state_bytes'] / 1024:>16.1f}")
    if args.json:
        write_json(Path(args.json), result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m samout.bench.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv), "python -m samout.bench.rollout " + shlex.join(argv or sys.argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
