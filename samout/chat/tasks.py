"""Built-in instruction data with exactly checkable answers (the chat demo's data).

Every task picks one item of a short list by a rule, which SamOut's running max suits and
whose answers are checkable exactly:

    largest    "Which number is the largest: 12 5 33 8?"           -> "It is 33."
    smallest   "Which number is the smallest: 12 5 33 8?"          -> "It is 5."
    alphabet   "Which word comes first alphabetically: pear fig?"  -> "It is fig."
    category   "Which of these is an animal: saw cat drill?"       -> "It is cat."

Answers say "It is X." rather than "X" so that the answer's item is the same token as in the
question (" 33", with its leading space): the model picks a token it has seen instead of
learning a second spelling of every item.

The rejected answer of a preference pair is a plausible wrong one: another item of the same
list (the runner-up for largest/smallest/alphabet); pairs are about longer lists (5-7 items)
and longer conversations (up to 3 turns) than the SFT conversations (3-5 items, 1-2 turns).
`write_task_files` writes train and held-out conversations and pairs as JSONL (a held-out
conversation's last question occurs in no training file), plus
`pretrain.txt`: the training questions as plain text, one per line, without answers.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

TASKS = ("largest", "smallest", "alphabet", "category")
CATEGORIES = {
    "an animal": "cat dog horse cow sheep goat mouse lion tiger bear wolf fox".split(),
    "a color": "red blue green yellow black white pink brown gray orange purple".split(),
    "a fruit": "apple pear plum peach grape lemon cherry melon mango banana".split(),
    "a tool": "hammer saw drill wrench shovel rake chisel spade axe knife".split(),
}
WORDS = sorted({w for words in CATEGORIES.values() for w in words})
SYSTEM_PROMPTS = ["Answer briefly.", "You are a helpful assistant.", "Be brief."]


def make_task(rng: random.Random, task: str | None = None, sizes: tuple[int, int] = (3, 5)
              ) -> tuple[str, str, str]:
    """(question, right answer, plausible wrong answer) about a list of sizes[0]..sizes[1] items."""
    question, right, wrong = _pick(rng, task or rng.choice(TASKS), rng.randint(*sizes))
    return question, ANSWER.format(right), ANSWER.format(wrong)


ANSWER = "It is {}."
NUMBERS = range(1, 51)


def _pick(rng: random.Random, task: str, k: int) -> tuple[str, str, str]:
    if task in ("largest", "smallest"):
        numbers = rng.sample(NUMBERS, k)
        ranked = sorted(numbers, reverse=task == "largest")
        return (f"Which number is the {task}: {' '.join(map(str, numbers))}?", str(ranked[0]), str(ranked[1]))
    if task == "alphabet":
        words = rng.sample(WORDS, k)
        ranked = sorted(words)
        return f"Which word comes first alphabetically: {' '.join(words)}?", ranked[0], ranked[1]
    name = rng.choice(sorted(CATEGORIES))
    answer = rng.choice(CATEGORIES[name])
    others = rng.sample([w for w in WORDS if w not in CATEGORIES[name]], k - 1)
    words = others + [answer]
    rng.shuffle(words)
    return f"Which of these is {name}: {' '.join(words)}?", answer, rng.choice(others)


QUESTION_PATTERNS = (
    re.compile(r"Which number is the (largest|smallest): ([0-9 ]+)\?"),
    re.compile(r"Which word comes first (alphabetically): ([a-z ]+)\?"),
    re.compile(r"Which of these is (an? [a-z]+): ([a-z ]+)\?"),
)


def solve(question: str) -> str | None:
    """The right answer ("It is X.") of a built-in task question, computed from the question
    alone (the checker of GRPO's verifiable `task` reward); None for any other text."""
    for pattern in QUESTION_PATTERNS:
        match = pattern.fullmatch(question.strip())
        if match is None:
            continue
        rule, items = match.group(1), match.group(2).split()
        if not items:
            return None
        if rule in ("largest", "smallest"):
            numbers = [int(x) for x in items]
            return ANSWER.format(max(numbers) if rule == "largest" else min(numbers))
        if rule == "alphabetically":
            return ANSWER.format(min(items))
        members = [w for w in items if w in CATEGORIES.get(rule, ())]
        return ANSWER.format(members[0]) if len(members) == 1 else None
    return None


def make_conversation(rng: random.Random, max_turns: int = 2, sizes: tuple[int, int] = (3, 5)
                      ) -> tuple[list[dict[str, str]], str]:
    """A conversation of 1..max_turns exchanges (sometimes with a system prompt), and the
    wrong answer to its last question."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    wrong = ""
    for _ in range(rng.randint(1, max_turns)):
        question, answer, wrong = make_task(rng, sizes=sizes)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages, wrong


DPO_SIZES = (5, 7)


def _questions(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def _heldout(rng: random.Random, n: int, seen: set[str], make) -> list:
    """n conversations whose last question occurs in no training conversation."""
    held = []
    while len(held) < n:
        conv = make(rng)
        if _questions(conv[0])[-1] not in seen:
            held.append(conv)
    return held


def write_task_files(out_dir: str | Path, train: int = 20000, heldout: int = 500,
                     seed: int = 0) -> dict[str, Path]:
    """sft_train.jsonl, sft_heldout.jsonl, dpo_train.jsonl, dpo_heldout.jsonl, grpo_train.jsonl
    (DPO's prompts with an "answer" column) and pretrain.txt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_convs = [make_conversation(rng) for _ in range(train)]
    seen = {question for conv, _ in train_convs for question in _questions(conv)}
    held = _heldout(rng, heldout, seen, make_conversation)
    # The preference pairs are harder than the SFT conversations (longer lists, up to three
    # turns), where a model fresh from SFT still errs: what DPO has to improve.
    dpo_rng = random.Random(seed + 1)

    def make_hard(r: random.Random):
        return make_conversation(r, max_turns=3, sizes=DPO_SIZES)

    dpo_train = [make_hard(dpo_rng) for _ in range(max(1, train // 4))]
    dpo_seen = seen | {question for conv, _ in dpo_train for question in _questions(conv)}
    dpo_held = _heldout(dpo_rng, heldout, dpo_seen, make_hard)
    names = ("sft_train", "sft_heldout", "dpo_train", "dpo_heldout", "grpo_train")
    paths = {name: out_dir / f"{name}.jsonl" for name in names}
    for name, convs in (("train", train_convs), ("heldout", held)):
        with paths[f"sft_{name}"].open("w") as f:
            for messages, _ in convs:
                f.write(json.dumps({"messages": messages}) + "\n")
    for name, convs in (("train", dpo_train), ("heldout", dpo_held)):
        with paths[f"dpo_{name}"].open("w") as f:
            for messages, wrong in convs:
                f.write(json.dumps({"prompt": messages[:-1], "chosen": messages[-1]["content"],
                                    "rejected": wrong}) + "\n")
    # GRPO's prompts are DPO's (the same questions, for a fair comparison), the reply sampled;
    # the right answer rides along as a column (the `task` reward computes it anyway).
    with paths["grpo_train"].open("w") as f:
        for messages, _ in dpo_train:
            f.write(json.dumps({"messages": messages[:-1], "answer": messages[-1]["content"]}) + "\n")
    # Pretraining text: the questions, without their answers.
    pretrain = out_dir / "pretrain.txt"
    with pretrain.open("w") as f:
        for messages, _ in train_convs:
            for m in messages:
                if m["role"] == "user":
                    f.write(m["content"] + "\n")
    paths["pretrain"] = pretrain
    return paths
