"""Benchmarks behind `samout bench`: speed (training and decoding), recall (MQAR).

Every benchmark builds its models with the same classes users train (`SamOut`,
`Transformer`) and steps them with the same optimizer (AdamW); nothing is special-cased.
"""
