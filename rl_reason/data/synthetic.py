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


def _story(rng: random.Random, difficulty: Difficulty) -> tuple[str, str, list, int]:
    """A name, an item, the steps [(sentence, expression, result)] and the final total."""
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    total = rng.randint(1, difficulty.max_operand)
    steps = [(f"{name} has {total} {item}.", "", total)]
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        op, b = _pick_step(rng, total, difficulty.max_operand)
        result = _apply(op, total, b)
        steps.append((_STEP_TEXT[op].format(name=name, item=item, b=b), f"{total}{op}{b}", result))
        total = result
    return name, item, steps, total


def _note(expr: str, result: int) -> str:
    return f"{expr}=<<{expr}={result}>>{result}"


def _problem(rng: random.Random, difficulty: Difficulty) -> dict[str, str]:
    name, item, steps, total = _story(rng, difficulty)
    question = " ".join([s for s, _, _ in steps] + [f"How many {item} does {name} have now?"])
    lines = [f"{name} has {_note(expr, result)} {item}." for _, expr, result in steps[1:]]
    lines.append(f"#### {total}")
    return {"question": question, "answer": "\n".join(lines), "final_answer": str(total)}


# What a pretraining document is made of, and how often (see pretraining_corpus).
PRETRAINING_MIX = (("story", 0.5), ("drill", 0.25), ("answer_key", 0.125), ("worked_key", 0.125))


def _pretraining_document(rng: random.Random, difficulty: Difficulty, mix) -> str:
    kind = rng.choices([k for k, _ in mix], [w for _, w in mix])[0]
    if kind == "drill":  # bare calculator notes
        notes = []
        for _ in range(rng.randint(3, 8)):
            total = rng.randint(1, difficulty.max_operand)
            op, b = _pick_step(rng, total, difficulty.max_operand)
            notes.append(_note(f"{total}{op}{b}", _apply(op, total, b)))
        return ", ".join(notes) + "."
    name, item, steps, total = _story(rng, difficulty)
    if kind == "story":  # the events, each followed by its calculation
        text = [steps[0][0]]
        for sentence, expr, result in steps[1:]:
            text.append(f"{sentence} Now {name} has {_note(expr, result)} {item}.")
        return " ".join(text)
    # An answer key: the question with a bare answer, or a one-line working.
    question = " ".join([s for s, _, _ in steps] + [f"How many {item} does {name} have now?"])
    if kind == "answer_key":
        return f"Question: {question}\nAnswer: #### {total}"
    working = ", then ".join(_note(expr, result) for _, expr, result in steps[1:])
    return f"Question: {question}\nAnswer: First {working}.\n#### {total}"


def pretraining_corpus(
    num_documents: int,
    *,
    seed: int = 0,
    difficulty: Difficulty = Difficulty(),
    mix: tuple[tuple[str, float], ...] = PRETRAINING_MIX,
) -> list[str]:
    """Arithmetic text that is not the task's solutions: what a "pretrained" model reads.

    The study's second starting point is a pretrained model that has read
    arithmetic on the web but was never fine-tuned on the task's reference
    solutions. This corpus stands in for that web text: stories whose events
    are each followed by their calculation (``Now Ann has 3+4=<<3+4=7>>7
    apples.``), drills of bare calculator notes, and answer keys -- a
    question with a bare ``#### n`` (``answer_key``) or a one-line working
    (``worked_key``: ``First 3+4=..., then ...``), never the task's
    one-step-a-line solution -- in the proportions of ``mix``. Every
    question in it is a train-split question (test questions are never
    read), and the same arguments give the same documents.
    """
    rng = random.Random(f"rl_reason.synthetic.pretraining:{seed}")
    documents = []
    while len(documents) < num_documents:
        document = _pretraining_document(rng, difficulty, mix)
        if "Question:" in document and split_of(document.split("\n")[0][10:]) != "train":
            continue
        documents.append(document)
    return documents


def with_bare_answers(examples: list[dict[str, str]], fraction: float) -> list[dict[str, str]]:
    """``examples`` with the worked solution of about ``fraction`` of them replaced by
    its bare final line (``#### n``): SFT data that teaches two ways to answer.

    A model fine-tuned on it sometimes works a problem out step by step and
    sometimes writes the answer at once; a small model's bare answers to
    two-step problems are mostly wrong. Its samples then differ by which way
    was taken -- the kind of difference a return token or a filter on
    correctness can select -- and not only by arithmetic slips. Which
    solutions are replaced depends on a hash of the question alone, so the
    same question always gets the same style.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the bare answer fraction must be in [0, 1], got {fraction}")

    def bare(question: str) -> bool:
        digest = hashlib.sha256(f"bare:{question}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    return [
        {**ex, "answer": f"#### {ex['final_answer']}"} if bare(ex["question"]) else ex
        for ex in examples
    ]


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
