"""Procedural arithmetic word problems written like GSM8K.

The built-in task that lets the whole pipeline (SFT, sampling, rewards, RL)
run and show learning on a CPU without downloading anything. Solutions use
GSM8K's conventions -- one step per line, ``<<a*b=c>>`` calculator notes and a
final ``#### n`` line -- so every reward and metric treats them like the
real data.

Splits are disjoint by construction: a question belongs to the test split
exactly when a hash of its text falls in the test fraction, whatever the
seed or difficulty that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
_MAX_MISSES = 10_000  # consecutive candidates adding nothing before giving up

_NAMES = (
    "Ann",
    "Ben",
    "Cara",
    "Dan",
    "Eva",
    "Finn",
    "Gia",
    "Hugo",
    "Ivy",
    "Jack",
    "Kim",
    "Leo",
)
_ITEMS = (
    "apples",
    "books",
    "cards",
    "coins",
    "eggs",
    "pens",
    "shells",
    "stamps",
    "stickers",
    "marbles",
    "toys",
    "cups",
)
_OPS = ("+", "-", "*", "/")
_STEP_TEXT = {
    "+": "Then {name} gets {b} more {item}.",
    "-": "Then {name} gives away {b} {item}.",
    "*": "Then the number of {item} {name} has is multiplied by {b}.",
    "/": "Then {name} splits the {item} into {b} equal groups and keeps one group.",
}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the generated problems are.

    The default (1-2 steps, operands up to 10) is what a tiny model learns on
    a CPU in a few hundred steps.
    """

    min_steps: int = 1
    max_steps: int = 2
    max_operand: int = 10

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be at least 2, got {self}")


def split_of(question: str) -> str:
    """The split a question belongs to, from a hash of its text alone."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def _apply(op: str, total: int, b: int) -> int:
    if op == "+":
        return total + b
    if op == "-":
        return total - b
    if op == "*":
        return total * b
    return total // b


def _pick_step(rng: random.Random, total: int, max_operand: int) -> tuple[str, int]:
    """An operation and operand that keep the running total a whole number >= 0."""
    divisors = [d for d in range(2, max_operand + 1) if total % d == 0]
    while True:
        op = rng.choice(_OPS)
        if op == "+":
            return op, rng.randint(1, max_operand)
        if op == "-" and total > 0:
            return op, rng.randint(1, min(total, max_operand))
        if op == "*":
            return op, rng.randint(2, max_operand)
        if op == "/" and total > 0 and divisors:
            return op, rng.choice(divisors)


def _problem(rng: random.Random, difficulty: Difficulty) -> dict[str, str]:
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    total = rng.randint(1, difficulty.max_operand)
    sentences = [f"{name} has {total} {item}."]
    lines = []
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        op, b = _pick_step(rng, total, difficulty.max_operand)
        result = _apply(op, total, b)
        sentences.append(_STEP_TEXT[op].format(name=name, item=item, b=b))
        expr = f"{total}{op}{b}"
        lines.append(f"{name} has {expr}=<<{expr}={result}>>{result} {item}.")
        total = result
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"#### {total}")
    return {
        "question": " ".join(sentences),
        "answer": "\n".join(lines),
        "final_answer": str(total),
    }


def generate(
    split: str,
    num_examples: int,
    *,
    seed: int = 0,
    difficulty: Difficulty = Difficulty(),
) -> list[dict[str, str]]:
    """``num_examples`` distinct problems of ``split``, the same for the same arguments.

    A longer list with the same seed starts with the shorter one. Raises
    ``ValueError`` when the difficulty allows too few distinct questions.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"rl_reason.synthetic:{split}:{seed}")
    examples, seen, misses = [], set(), 0
    while len(examples) < num_examples:
        example = _problem(rng, difficulty)
        question = example["question"]
        if question not in seen and split_of(question) == split:
            seen.add(question)
            examples.append(example)
            misses = 0
        elif (misses := misses + 1) == _MAX_MISSES:
            raise ValueError(
                f"found only {len(examples)} distinct {split} questions of {difficulty}; "
                "ask for fewer or raise the difficulty"
            )
    return examples
