"""`SamplingParams`: how one sequence is decoded (`samout generate`, `samout chat`, the server).

Every field is checked when the object is made, so a bad value fails before any model work
(the server maps the same limits to 400s naming the field, samout.serve.protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from samout.errors import SamoutError

# The defaults of the API and of `samout generate`.
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    # CTRL's: positive logits of tokens already seen divided by it, negative ones multiplied;
    # "seen" is the prompt and the reply, or only their last `repetition_window` tokens.
    repetition_penalty: float = 1.0
    stop_at_eot: bool = True
    seed: int | None = None
    repetition_window: int | None = None
    # OpenAI's: logit -= presence * (count > 0) + frequency * count, counting generated tokens.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0  # keep tokens of probability >= min_p * the largest (after temperature)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    # The stop tokens are masked until this many tokens are generated, unless a grammar allows
    # nothing else (a complete JSON value ends where its grammar says).
    min_tokens: int = 0
    # Per generated token, the log-probability of the token and of the `logprobs` most likely
    # tokens (0: the token's only; None: nothing), of the model's raw distribution.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SamoutError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise SamoutError(f"temperature must be a finite number >= 0 (0 is greedy), "
                              f"got {self.temperature!r}")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise SamoutError(f"top_k must be an integer of at least 1, got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamoutError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
            raise SamoutError(f"repetition_penalty must be a finite number > 0, "
                              f"got {self.repetition_penalty!r}")
        if not isinstance(self.stop_at_eot, bool):
            raise SamoutError(f"stop_at_eot must be true or false, got {self.stop_at_eot!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise SamoutError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.repetition_window is not None and not (_is_int(self.repetition_window)
                                                       and self.repetition_window >= 1):
            raise SamoutError(f"repetition_window must be an integer of at least 1, "
                              f"got {self.repetition_window!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_number(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise SamoutError(f"{name} must lie in [-2, 2], got {value!r}")
        if not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise SamoutError(f"min_p must lie in [0, 1], got {self.min_p!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamoutError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                if not (_is_int(token) and token >= 0):
                    raise SamoutError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
                if not (_is_number(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                    raise SamoutError(f"logit_bias values must lie in [-100, 100], got {bias!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamoutError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and self.logprobs >= 0):
            raise SamoutError(f"logprobs must be a non-negative integer, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether anything changes the logits before temperature (the plain rows skip it all)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or bool(self.logit_bias) or self.min_tokens > 0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
