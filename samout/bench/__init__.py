"""Benchmarks behind `samout bench`: params, speed (training and decoding), recall (MQAR),
quality (bits per byte), mixers (fused vs reference kernels) and onnx (exported graphs).

Every benchmark builds its models with the same classes users train (`SamOut`,
`Transformer`) and steps them with the same optimizer (AdamW); nothing is special-cased.
All print the same header (`common.header_lines`: machine, torch version, threads, commit).
"""
