"""Is a predicted final answer the gold one?

Numbers are compared exactly when both are whole, otherwise with a relative
tolerance (so ``0.3333`` matches ``1/3`` but ``1000001`` never matches
``1000000``). Answers that still look like LaTeX after number parsing go to
math-verify in a time-limited worker; anything else is compared as
whitespace- and case-normalised text.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

from rl_reason.rewards.latex import LatexChecker
from rl_reason.rewards.numbers import format_number, parse_number

DEFAULT_REL_TOL = 1e-4
_LATEX_HINT = re.compile(r"[\\^{}]")


@functools.cache
def default_latex_checker() -> LatexChecker:
    """One checker per process, started on the first LaTeX answer."""
    return LatexChecker()


def numbers_equal(a: Fraction, b: Fraction, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """Exact for whole numbers; within ``rel_tol`` of the larger magnitude otherwise."""
    if a == b or (a.denominator == 1 and b.denominator == 1):
        return a == b
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _normalise_text(answer: str) -> str:
    return " ".join(answer.split()).lower()


def canonical_answer(answer: str | None) -> str | None:
    """A key under which equal answers vote together: ``$1,080`` and ``1080.0`` -> ``1080``."""
    if answer is None:
        return None
    value = parse_number(answer)
    if value is not None:
        return format_number(value)
    return _normalise_text(answer) or None


def is_equivalent(
    predicted: str | None,
    gold: str,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    latex: LatexChecker | None = None,
) -> bool:
    """Whether ``predicted`` (None = no answer) states the ``gold`` answer.

    ``latex`` is the checker for LaTeX answers (default: one shared per
    process); it is only started when an answer needs it.
    """
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return numbers_equal(a, b, rel_tol)
    if _LATEX_HINT.search(predicted) or _LATEX_HINT.search(gold):
        return (latex or default_latex_checker()).equivalent(gold, predicted)
    return _normalise_text(predicted) == _normalise_text(gold) != ""
