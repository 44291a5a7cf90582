"""One decoding core for `generate`, `chat`, the server's engine and the benchmarks: logits
processors with per-row settings, a seeded sampler, logprobs, an incremental detokenizer with
stop strings, and token constraints (grammars)."""
