"""`samout bench NAME`: every benchmark of samout, one per entry of BENCHMARKS below.

speed, recall, quality and serve compare SamOut with the matched Transformer and write JSON
and PNG plots into --out; mixers compares the fused and reference kernels; onnx measures the
exported graphs; grammar the structured-output engines; rollout GRPO rollouts. Each prints a header with
the machine, torch version, threads and git commit (`samout.bench.common.header_lines`).
`--quick` runs a small version.
"""

from __future__ import annotations

import argparse
import importlib
import warnings
from types import ModuleType
from typing import Any

from samout.bench import (
    chat,
    grammar,
    mixers,
    onnx_export,
    params,
    quality,
    recall,
    rollout,
    serve,
    speed,
    stores,
)

# Benchmark name -> the module that declares its flags (`add_arguments(parser)`) and runs it
# (`run(args) -> int`; its docstring is the benchmark's --help), and its line in `samout bench --help`.
BENCHMARKS: dict[str, tuple[ModuleType, str]] = {
    "speed": (speed, "training tokens/s and memory vs length; decode latency and memory vs context"),
    "recall": (recall, "multi-query associative recall (MQAR) accuracy"),
    "quality": (quality, "validation bits per byte: SamOut mixers vs the matched Transformer, trained alike"),
    "chat": (chat, "per-turn cost of a chat: time to first token of turn k, state carried vs history "
                   "re-prefilled"),
    "serve": (serve, "samout serve under N concurrent streaming clients: tokens/s, latency, memory; "
                     "follow-up turns with the state cache"),
    "stores": (stores, "state-cache hits from memory, a --state-cache-dir and Redis: time to first token "
                       "of a follow-up after a long conversation"),
    "params": (params, "parameter counts: SamOut presets vs standard and matched Transformers"),
    "mixers": (mixers, "fused vs reference mixer kernels: training speed, memory, MFU, decode latency"),
    "onnx": (onnx_export, "ONNX export: graph accuracy, int8 size and accuracy, decode latency"),
    "grammar": (grammar, "structured output: grammar engines' compile, mask and advance times on samout "
                         "vocabularies, and the validity of what they let through"),
    "rollout": (rollout, "GRPO rollouts, G completions of one prompt: SamOut's forked state vs the "
                         "Transformer's copied KV cache, tokens/s and memory"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark SamOut against a matched softmax Transformer",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, (module, summary) in BENCHMARKS.items():
        bench = sub.add_parser(name, help=summary, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(bench)
        bench.set_defaults(func=module.run)


# The handlers that lived here before each benchmark ran itself; kept for one release.
_MOVED = {"run_speed_command": "speed", "run_recall_command": "recall", "run_quality_command": "quality",
          "run_serve_command": "serve", "run_params_command": "params", "run_lowp_command": "lowp"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = importlib.import_module(f"samout.bench.{_MOVED[name]}")
        warnings.warn(f"samout.commands.bench.{name} is deprecated: use samout.bench.{_MOVED[name]}.run",
                      DeprecationWarning, stacklevel=2)
        return module.run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
