"""Where should a hybrid's attention layer go, and does the forgetting max matter?

MQAR accuracy (the task of `samout bench recall`) of a 4-layer SamOut with one attention
layer, for each placement of that layer and each way of starting the decay δ, all else
equal (same steps, batch, data, seed). This is the experiment behind the `hybrid` variants
and presets (attention second, δ starting at 0.5); docs/benchmarks.md, "Hybrid layers".

    python scripts/hybrid_placement.py                 # 64 tokens, 8 pairs, 1200 steps
    python scripts/hybrid_placement.py --task 128x16 --steps 800
"""

from __future__ import annotations

import argparse
import time

import torch

from samout.bench.common import build_model
from samout.bench.recall import RecallSettings, parse_tasks, train_and_evaluate
from samout.config import SamOutConfig

PLACEMENTS = {"last": ["maxstate", "maxstate", "maxstate", "attention"],
              "second": ["maxstate", "attention", "maxstate", "maxstate"]}
DECAYS = {"no decay": {}, "δ from 0.001": {"max_decay": True, "max_decay_init": 1e-3},
          "δ from 0.5": {"max_decay": True, "max_decay_init": 0.5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="64x8", help="LENGTHxPAIRS (default 64x8)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (task,) = parse_tasks(args.task)
    settings = RecallSettings(steps=args.steps, batch_size=32, eval_examples=512)
    base = SamOutConfig.from_preset("tiny", vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                    num_layers=4, num_heads=4)
    print(f"MQAR {task[0]} tokens, {task[1]} pairs; D={args.hidden_size}, 4 layers, vocab {args.vocab_size}, "
          f"{args.steps} steps of batch 32, torch {torch.__version__}")
    print(f"{'attention':>10} {'decay':>14} {'accuracy':>9} {'seconds':>8}")
    for where, layer_types in PLACEMENTS.items():
        for decay_name, decay in DECAYS.items():
            config = SamOutConfig.from_dict({**base.to_dict(), "layer_types": layer_types, **decay})
            start = time.perf_counter()
            model = build_model(config, torch.device("cpu"), settings.seed)
            run = train_and_evaluate(model, task, settings, "cpu")
            print(f"{where:>10} {decay_name:>14} {run['accuracy']:>9.3f} {time.perf_counter() - start:>8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
