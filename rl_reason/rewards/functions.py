"""The rule-based reward functions.

Every reward is a frozen dataclass (its fields are the settings a config can
give) called as ``reward(completions, batch)``: ``completions[i]`` is the
decoded text sampled for the example whose columns are ``batch[col][i]``
(``question``, ``answer`` -- the reference solution -- ``final_answer``, ...).
A sparse reward (``dense = False``) returns one float per completion; a
dense one returns, per completion, a list of ``(character offset, reward)``
pairs, the offset being the end of the text the reward is for. A reward that
runs a program on the device mesh says ``collective = True``: in a multi-host
run every process then calls it with every row, where rule-based rewards are
split across the processes (``compose``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

from rl_reason.rewards import calculator, steps
from rl_reason.rewards.equivalence import (
    DEFAULT_REL_TOL,
    PARALLEL_MIN_PAIRS,
    chunks,
    default_latex_checker,
    judge_many,
    numbers_equal,
)
from rl_reason.rewards.extraction import Mode, extract_answer
from rl_reason.rewards.latex import CheckerStats, LatexChecker
from rl_reason.rewards.parallel import process_map
from rl_reason.rewards.numbers import parse_number

log = logging.getLogger(__name__)

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


def extract_answers(texts: Sequence[str], mode: Mode) -> list[str | None]:
    return [extract_answer(text, mode) for text in texts]


@dataclasses.dataclass(frozen=True)
class Correctness:
    """The study's sparse reward: ``correct`` if the final answer equals the gold one.

    Answers are judged by :func:`~rl_reason.rewards.equivalence.judge_many`:
    each distinct (answer, gold) pair once, the batch's LaTeX checks in
    parallel on the checker's workers. ``rel_tol`` applies only to a written
    decimal against a value no decimal states exactly (see ``equivalence``).
    Each call logs (``rl_reason.rewards.functions``, INFO) its completions per
    second and the LaTeX checks, timeouts and seconds it cost; ``last_stats``
    holds the same figures for the experiment's metrics.
    """

    dense: ClassVar[bool] = False
    correct: float = 1.0
    incorrect: float = 0.0
    mode: Mode = "strict"
    rel_tol: float = DEFAULT_REL_TOL
    gold_column: str = "final_answer"
    latex: LatexChecker | None = None  # None: the process's shared checker
    processes: int = 1  # > 1: extraction and non-LaTeX judging in that many subprocesses
    last_stats: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __call__(self, completions: Sequence[str], batch: Batch) -> list[float]:
        golds = column(batch, self.gold_column, len(completions))
        checker = self.latex if self.latex is not None else default_latex_checker()
        before = dataclasses.replace(checker.stats) if isinstance(checker, LatexChecker) else None
        begin = time.perf_counter()
        if self.processes > 1 and len(completions) >= PARALLEL_MIN_PAIRS:
            parts = chunks(list(completions), self.processes)
            extracted = process_map(self.processes).map(
                extract_answers, [(part, self.mode) for part in parts]
            )
            answers = [answer for part in extracted for answer in part]
        else:
            answers = extract_answers(completions, self.mode)
        verdicts = judge_many(
            answers, golds, rel_tol=self.rel_tol, latex=checker, processes=self.processes
        )
        seconds = time.perf_counter() - begin
        spent = checker.stats.minus(before) if before is not None else CheckerStats()
        self.last_stats.clear()
        self.last_stats.update(
            completions=len(completions),
            seconds=seconds,
            completions_per_second=len(completions) / seconds if seconds > 0 else 0.0,
            latex_checks=spent.checks,
            latex_timeouts=spent.timeouts,
            latex_seconds=spent.seconds,
        )
        log.info(
            "correctness: %d completions in %.3f s (%.0f/s); %d LaTeX checks, %d timed out, %.3f s",
            len(completions), seconds, self.last_stats["completions_per_second"],
            spent.checks, spent.timeouts, spent.seconds,
        )  # fmt: skip
        return [self.correct if ok else self.incorrect for ok in verdicts]


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
