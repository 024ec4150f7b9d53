"""Prompt and target text, zero-shot or few-shot.

One layout for every task, the one lm-eval-harness uses for GSM8K:
``Question: ...\\nAnswer:`` then the solution after a space, exemplars
separated by a blank line. A model that keeps writing past its answer starts a
new ``Question:``; :func:`truncate_completion` cuts it there.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

EXEMPLAR_SEPARATOR = "\n\n"
STOP_SEQUENCES = ("\n\nQuestion:", "\nQuestion:")


def format_completion(answer: str) -> str:
    """The target text after the prompt: the solution, ending with its ``#### n`` line."""
    return " " + answer.strip()


def format_prompt(question: str, exemplars: Sequence[Mapping[str, str]] = ()) -> str:
    """The prompt for ``question``, preceded by worked ``exemplars`` (dicts with question and answer)."""
    shots = [
        f"Question: {ex['question'].strip()}\nAnswer:{format_completion(ex['answer'])}"
        for ex in exemplars
    ]
    return EXEMPLAR_SEPARATOR.join([*shots, f"Question: {question.strip()}\nAnswer:"])


def select_exemplars(
    train_examples: Sequence[Mapping[str, str]], k: int, *, seed: int = 0
) -> list[Mapping[str, str]]:
    """``k`` distinct train examples, the same ones for the same seed."""
    if not 0 <= k <= len(train_examples):
        raise ValueError(f"cannot pick {k} exemplars from {len(train_examples)} examples")
    indices = random.Random(f"rl_reason.exemplars:{seed}").sample(range(len(train_examples)), k)
    return [train_examples[i] for i in indices]


def truncate_completion(text: str) -> str:
    """``text`` up to the first point where the model starts another question."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]
