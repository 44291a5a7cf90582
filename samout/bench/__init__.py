"""Benchmarks behind `samout bench`: params, speed (training and decoding; --lowp: low
precision), recall (MQAR), quality (bits per byte), chat (per-turn latency), serve (the
HTTP server under load), stores (state-cache hits per tier), mixers (fused vs reference
kernels) and onnx (exported graphs).

Every benchmark builds its models with the same classes users train (`SamOut`,
`Transformer`) and steps them with the same optimizer (AdamW); nothing is special-cased.
All print the same header (`common.header_lines`: machine, torch version, threads, commit).

Each module declares its own flags, `add_arguments(parser)`, and runs from them,
`run(args) -> int`; `samout/commands/bench.py` lists them, and `arguments.py` holds the
flags they share. A new benchmark is a module with those two functions and a line there.
"""
