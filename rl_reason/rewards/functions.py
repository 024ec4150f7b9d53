"""The rule-based reward functions.

Every reward is a frozen dataclass (its fields are the settings a config can
give) called as ``reward(completions, batch)``: ``completions[i]`` is the
decoded text sampled for the example whose columns are ``batch[col][i]``
(``question``, ``answer`` -- the reference solution -- ``final_answer``, ...).
A sparse reward (``dense = False``) returns one float per completion; a
dense one returns, per completion, a list of ``(character offset, reward)``
pairs, the offset being the end of the text the reward is for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

from rl_reason.rewards import calculator, steps
from rl_reason.rewards.equivalence import DEFAULT_REL_TOL, is_equivalent, numbers_equal
from rl_reason.rewards.extraction import Mode, extract_answer
from rl_reason.rewards.latex import LatexChecker
from rl_reason.rewards.numbers import parse_number

Batch = Mapping[str, Sequence[Any]]
Dense = list[list[tuple[int, float]]]


def column(batch: Batch, name: str, size: int) -> Sequence[Any]:
    """``batch[name]``, checked to have one entry per completion."""
    if name not in batch:
        raise KeyError(f"the reward needs column {name!r}; the batch has {sorted(batch)}")
    values = batch[name]
    if len(values) != size:
        raise ValueError(f"column {name!r} has {len(values)} rows for {size} completions")
    return values


@dataclasses.dataclass(frozen=True)
class Correctness:
    """The study's sparse reward: ``correct`` if the final answer equals the gold one."""

    dense: ClassVar[bool] = False
    correct: float = 1.0
    incorrect: float = 0.0
    mode: Mode = "strict"
    rel_tol: float = DEFAULT_REL_TOL
    gold_column: str = "final_answer"
    latex: LatexChecker | None = None  # None: the process's shared checker

    def __call__(self, completions: Sequence[str], batch: Batch) -> list[float]:
        golds = column(batch, self.gold_column, len(completions))
        return [
            self.correct
            if is_equivalent(
                extract_answer(text, self.mode), str(gold), rel_tol=self.rel_tol, latex=self.latex
            )
            else self.incorrect
            for text, gold in zip(completions, golds)
        ]


@dataclasses.dataclass(frozen=True)
class Format:
    """``formatted`` when the completion states a final answer that reads as a number."""

    dense: ClassVar[bool] = False
    formatted: float = 1.0
    unformatted: float = 0.0
    mode: Mode = "strict"

    def __call__(self, completions: Sequence[str], batch: Batch) -> list[float]:
        del batch  # format does not depend on the example
        return [
            self.formatted
            if (answer := extract_answer(text, self.mode)) is not None
            and parse_number(answer) is not None
            else self.unformatted
            for text in completions
        ]


def reference_results(solution: str) -> list[Fraction]:
    """The intermediate results a reference solution states in its calculator notes."""
    values = (calculator.stated_value(note) for note in calculator.find_notes(solution))
    return [value for value in values if value is not None]


@dataclasses.dataclass(frozen=True)
class StepMatch:
    """The study's dense heuristic: credit each step that reaches a reference intermediate result.

    A step earns credit for each of its calculator notes that is arithmetically
    right (see :func:`calculator.is_consistent`) and states a result of the
    reference solution not yet matched, so repeating a correct step earns
    nothing more. All results matched = ``scale`` in total, paid at the ends
    of the steps that matched them.
    """

    dense: ClassVar[bool] = True
    scale: float = 1.0
    rel_tol: float = DEFAULT_REL_TOL
    reference_column: str = "answer"

    def __call__(self, completions: Sequence[str], batch: Batch) -> Dense:
        references = column(batch, self.reference_column, len(completions))
        return [
            self._one(text, reference_results(str(ref)))
            for text, ref in zip(completions, references)
        ]

    def _one(self, text: str, unmatched: list[Fraction]) -> list[tuple[int, float]]:
        credit = self.scale / len(unmatched) if unmatched else 0.0
        rewards = []
        for step in steps.split_steps(text):
            matched = 0
            for note in calculator.find_notes(step.text):
                value = calculator.stated_value(note)
                if value is None or not calculator.is_consistent(note):
                    continue
                hit = next((r for r in unmatched if numbers_equal(value, r, self.rel_tol)), None)
                if hit is not None:
                    unmatched.remove(hit)
                    matched += 1
            if matched:
                rewards.append((step.end, matched * credit))
        return rewards


@dataclasses.dataclass(frozen=True)
class CalculatorConsistency:
    """Checks every calculator note the model writes; pays ``consistent`` or ``inconsistent`` at its end.

    The default only penalises wrong or unreadable notes, so writing many
    trivial notes is not rewarded.
    """

    dense: ClassVar[bool] = True
    consistent: float = 0.0
    inconsistent: float = -1.0

    def __call__(self, completions: Sequence[str], batch: Batch) -> Dense:
        del batch  # consistency does not depend on the example
        return [
            [
                (note.end, self.consistent if calculator.is_consistent(note) else self.inconsistent)
                for note in calculator.find_notes(text)
            ]
            for text in completions
        ]
