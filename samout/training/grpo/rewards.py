"""Reward functions: `--reward NAME` (built-in) or `--reward module:function`.

A reward function has TRL's signature, so TRL reward functions work unchanged:

    def reward(completions, **kwargs) -> list[float | None]

`completions` holds one entry per completion; the prompts are conversations, so (as in TRL)
each entry is a list of one assistant message, `[{"role": "assistant", "content": TEXT}]`.
The keyword arguments are `prompts` (each completion's prompt messages), `completion_ids`
(its token ids) and every extra column of the prompts file, one value per completion.
None means "does not apply" and counts as 0 in the weighted sum (TRL: nansum).

Built-in, for the chat demo's checkable tasks (samout.chat.tasks) and any data with a
reference column:

    task     1 if the reply is exactly the right answer to the last question of a built-in task
             ("Which number is the largest: 4 9 2?" -> "It is 9."), computed from the question
    answer   1 if the reply equals the "answer" column (surrounding whitespace ignored)
    format   1 if the reply has the tasks' answer shape "It is X." (one item, nothing more)

No reward pays for length: a rambling reply is not an exact answer.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from samout.chat.tasks import solve
from samout.errors import SamoutError

RewardFn = Callable[..., list]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational [{"content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


def _last_question(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def task_reward(completions: list, prompts: list | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 when the reply is the right answer of a built-in task question, else 0.0; None for a
    prompt that is no built-in task."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        right = solve(_last_question(prompts[i])) if prompts is not None else None
        out.append(None if right is None else float(completion_text(completion).strip() == right))
    return out


def answer_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float | None]:
    if answer is None:
        raise SamoutError("--reward answer needs an \"answer\" column in the prompts file")
    return [None if a is None else float(completion_text(c).strip() == str(a).strip())
            for c, a in zip(completions, answer)]


ANSWER_SHAPE = re.compile(r"It is [^\s.]+\.")


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    return [float(ANSWER_SHAPE.fullmatch(completion_text(c).strip()) is not None) for c in completions]


BUILTIN_REWARDS: dict[str, RewardFn] = {"task": task_reward, "answer": answer_reward, "format": format_reward}


def load_reward(spec: str) -> tuple[str, RewardFn]:
    """(name for the logs, function) of a built-in name or `module:function`; one-line errors."""
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise SamoutError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN_REWARDS)} or "
                          "module:function (a function(completions, **columns) -> list[float])")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module's
        raise SamoutError(f"--reward {spec}: cannot import {module_name!r} "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SamoutError(f"--reward {spec}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise SamoutError(f"--reward {spec}: {attr!r} is not a function")
    return attr.rpartition(".")[2], fn


def score(rewards: list[tuple[str, RewardFn]], weights: list[float], completions: list,
          **kwargs: Any) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, each reward's values with None as NaN)."""
    import math

    per: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for (name, fn), weight in zip(rewards, weights):
        values = fn(completions=completions, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise SamoutError(f"reward {name} returned {type(values).__name__} "
                              f"{'of length ' + str(len(values)) if hasattr(values, '__len__') else ''}, "
                              f"expected a list of {len(completions)} numbers")
        clean = [math.nan if v is None else float(v) for v in values]
        per[name] = clean
        total = [t + (0.0 if math.isnan(v) else weight * v) for t, v in zip(total, clean)]
    return total, per
