"""Is a predicted final answer the gold one?

Both answers go through the same steps:

1. :func:`~rl_reason.rewards.normalize.normalise`: delimiters, spacing,
   ``\\left``/``\\right``, ``\\dfrac``, degree and percent marks, trailing
   periods and the like are removed; units and bases are kept.
2. Structure: a matrix, a set ``\\{...\\}``, a bracketed tuple or interval
   (``(1,2]`` keeps its brackets), a union of intervals, a bare list
   ``1, 2`` (unordered, as MATH's "separated by commas"), or one atom.
   Tuples, intervals and matrices compare element by element in order; sets,
   unions and bare lists as multisets. Different kinds are different answers.
3. Atoms: ``x = 5`` (a lone variable on the left, or ``x \\in``) is read as
   ``5`` against a gold without one, and two assignments need the same
   variable. Words (``\\text{even}``, ``(C)``) compare as case-free text.
   A trailing unit (``\\text{inches}^3``) must match when both sides state
   one; a missing unit is not held against an answer. Numbers are read
   exactly (integers, decimals, ``a/b``, ``\\frac``, mixed numbers
   ``2\\frac{1}{3}``, base numerals ``4210_{5}``) and compared exactly; a base
   numeral equals only the same digits in the same base (or without one).
4. Anything else (radicals, powers, expressions, equations, ``i``) is sent,
   if :func:`~rl_reason.rewards.guard.refusal` passes it, to the
   :class:`~rl_reason.rewards.latex.LatexChecker`, which proves exact values
   equal with sympy and otherwise asks math-verify, each check under a time
   limit (default 1 s).

Tolerance: two exact values are equal only when they are equal. ``rel_tol``
(default :data:`DEFAULT_REL_TOL` = 1e-4, relative to the larger magnitude)
applies only when one side is a *written decimal* and the other a value no
decimal can state exactly (1/3, sqrt(2), pi): ``0.3333`` matches ``1/3``,
``1.4142`` matches ``\\sqrt{2}``, but ``.35626`` never matches ``.35625``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Sequence
from fractions import Fraction

from rl_reason.rewards.guard import MAX_DEPTH as GUARD_MAX_DEPTH
from rl_reason.rewards.guard import refusal
from rl_reason.rewards.latex import LatexChecker
from rl_reason.rewards.normalize import normalise
from rl_reason.rewards.numbers import DEFAULT_REL_TOL, format_number
from rl_reason.rewards.parallel import process_map
from rl_reason.rewards.values import Number, read_number, split_unit, terminates

__all__ = [
    "DEFAULT_REL_TOL",
    "canonical_answer",
    "default_latex_checker",
    "is_equivalent",
    "judge_many",
    "numbers_equal",
]

MAX_ELEMENTS = 64  # elements of one tuple, set or list
MAX_STRUCTURE_DEPTH = 8  # tuples of tuples of ...
MAX_LATEX_CHECKS = 16  # LaTeX checks one comparison may ask for
PARALLEL_MIN_PAIRS = 2000  # fewer distinct pairs are judged faster than shipped to processes
MAX_NESTING = 2 * GUARD_MAX_DEPTH  # brackets; deeper answers are compared as strings only

Oracle = Callable[[str, str], bool]  # (gold atom, predicted atom) -> equal?

_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_IDENTIFIER = re.compile(
    r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?'*(?:\((?:[A-Za-z]|\\[A-Za-z]+)\))?"
)
_TEXTLIKE = re.compile(r"\(?[a-z][a-z ']*\)?")
_TEXT_WRAPPER = re.compile(r"\\text\{([^{}]*)\}")


@functools.cache
def default_latex_checker() -> LatexChecker:
    """One checker per process, started on the first LaTeX answer."""
    return LatexChecker()


def numbers_equal(a: Fraction, b: Fraction, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """Exact, unless exactly one of the two has no finite decimal expansion.

    Then the other may be a rounding of it and they are equal within
    ``rel_tol`` of the larger magnitude (``3333/10000`` vs ``1/3``). Two
    finite decimals (``0.35626`` vs ``0.35625``), two whole numbers, or two
    fractions without finite expansions are compared exactly. (Without the
    written form this cannot tell ``448/15625`` from a rounding; answers are
    judged with the written form by :func:`is_equivalent`.)
    """
    if a == b:
        return True
    if terminates(a) == terminates(b):
        return False
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _written_numbers_equal(a: Number, b: Number, rel_tol: float) -> bool:
    if a.base is not None or b.base is not None:
        if a.base is not None and b.base is not None and a.base != b.base:
            return False
        digits = []
        for n in (a, b):
            if n.digits is not None:
                digits.append(n.digits)
            elif n.value.denominator == 1 and not n.written_decimal and n.value >= 0:
                digits.append(str(n.value.numerator))
            else:
                return False
        return digits[0] == digits[1] and (a.value < 0) == (b.value < 0)
    if a.value == b.value:
        return True
    rounding = (a.written_decimal and not terminates(b.value)) or (
        b.written_decimal and not terminates(a.value)
    )
    return rounding and abs(a.value - b.value) <= Fraction(rel_tol) * max(
        abs(a.value), abs(b.value)
    )


def _split_top(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` where no bracket is open."""
    parts, depth, start, i = [], 0, 0, 0
    n, width = len(text), len(separator)
    while i < n:
        c = text[i]
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif depth == 0 and text.startswith(separator, i):
            if separator == "=" and i > 0 and text[i - 1] in "<>!":
                i += 1
                continue
            parts.append(text[start:i])
            start = i + width
            i += width
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _closes_at_end(text: str) -> bool:
    """Whether the bracket opening ``text`` is the one its last character closes."""
    depth = 0
    for i, c in enumerate(text):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
            if depth == 0:
                return i == len(text) - 1
    return False


@dataclasses.dataclass(frozen=True)
class _Structure:
    kind: str  # atom, matrix, set, bracket, union, list
    elements: tuple  # strings, or rows (tuples of strings) for a matrix
    brackets: str = ""  # "(]" for an interval or tuple


def _structure(text: str) -> _Structure:
    if match := _MATRIX.fullmatch(text):
        rows = [r for r in match.group(2).split("\\\\") if r.strip()]
        return _Structure("matrix", tuple(tuple(c.strip() for c in r.split("&")) for r in rows))
    if text.startswith("\\{") and text.endswith("\\}") and _closes_at_end(text[1:-1]):
        inner = text[2:-2]
        return _Structure("set", tuple(_split_top(inner, ",")) if inner else ())
    if text == "\\emptyset":
        return _Structure("set", ())
    if len(_split_top(text, "\\cup")) > 1:
        return _Structure("union", tuple(_split_top(text, "\\cup")))
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]" and _closes_at_end(text):
        elements = _split_top(text[1:-1], ",")
        if len(elements) > 1:
            return _Structure("bracket", tuple(elements), text[0] + text[-1])
        if text[0] == "(" and text[-1] == ")":
            return _structure(text[1:-1]) if text[1:-1] else _Structure("atom", (text,))
    elements = _split_top(text, ",")
    if len(elements) > 1:
        return _Structure("list", tuple(elements))
    return _Structure("atom", (text,))


class _Judge:
    """One comparison: its tolerance, its LaTeX oracle and how many checks it may still ask."""

    def __init__(self, rel_tol: float, oracle: Oracle):
        self.rel_tol = rel_tol
        self.oracle = oracle
        self.checks_left = MAX_LATEX_CHECKS

    def latex(self, gold: str, predicted: str) -> bool:
        if self.checks_left <= 0 or refusal(gold) or refusal(predicted):
            return False
        self.checks_left -= 1
        return self.oracle(gold, predicted)

    def same(self, p: str, g: str, depth: int = 0) -> bool:
        if p == g:
            return True
        if depth > MAX_STRUCTURE_DEPTH or not p or not g:
            return False
        sp, sg = _structure(p), _structure(g)
        if len(sp.elements) > MAX_ELEMENTS or len(sg.elements) > MAX_ELEMENTS:
            return False
        if sp.kind == "atom" and sg.kind == "atom":
            return self.atoms(p, g, depth)
        if sp.kind == "atom" or sg.kind == "atom":
            # "x \in [1, 2)" was normalised to the interval; "x = (1, 2)" still holds one.
            ap, ag = _assignment(p), _assignment(g)
            if ap is not None and sp.kind == "atom":
                return self.same(ap[1], g, depth + 1)
            if ag is not None and sg.kind == "atom":
                return self.same(p, ag[1], depth + 1)
            return False
        unordered = {"set", "list", "union"}
        if sp.kind != sg.kind and not (sp.kind in unordered and sg.kind in unordered):
            return False
        if sp.kind == "matrix":
            return [len(r) for r in sp.elements] == [len(r) for r in sg.elements] and all(
                self.same(a, b, depth + 1)
                for ra, rb in zip(sp.elements, sg.elements)
                for a, b in zip(ra, rb)
            )
        if sp.kind == "bracket":
            return (
                sp.brackets == sg.brackets
                and len(sp.elements) == len(sg.elements)
                and all(self.same(a, b, depth + 1) for a, b in zip(sp.elements, sg.elements))
            )
        return self.multiset(sp.elements, sg.elements, depth)

    def multiset(self, predicted: Sequence[str], gold: Sequence[str], depth: int) -> bool:
        if len(predicted) != len(gold):
            return False
        left_p, left_g = list(predicted), list(gold)
        for g in list(left_g):  # identical elements first: no LaTeX check needed
            if g in left_p:
                left_p.remove(g)
                left_g.remove(g)
        for g in left_g:
            match = next((p for p in left_p if self.same(p, g, depth + 1)), None)
            if match is None:
                return False
            left_p.remove(match)
        return True

    def atoms(self, p: str, g: str, depth: int) -> bool:
        ap, ag = _assignment(p), _assignment(g)
        if ap is not None and ag is not None:
            return ap[0] == ag[0] and self.same(ap[1], ag[1], depth + 1)
        if ap is not None:
            return self.same(ap[1], g, depth + 1)
        if ag is not None:
            return self.same(p, ag[1], depth + 1)
        tp, tg = _text_form(p), _text_form(g)
        if tp is not None or tg is not None:  # words are never numbers or expressions
            return tp == tg
        core_p, unit_p = split_unit(p)
        core_g, unit_g = split_unit(g)
        if unit_p is not None and unit_g is not None and unit_p != unit_g:
            return False
        if core_p == core_g:
            return True
        np, ng = read_number(core_p), read_number(core_g)
        if np is not None and ng is not None:
            return _written_numbers_equal(np, ng, self.rel_tol)
        if (np is not None and np.base is not None) or (ng is not None and ng.base is not None):
            return False
        return self.latex(core_g, core_p)


def _assignment(text: str) -> tuple[str, str] | None:
    """``x=5`` -> (``x``, ``5``), ``a=b=7`` -> (``a``, ``7``); None unless a variable is set."""
    if "=" not in text:
        return None
    parts = _split_top(text, "=")
    if len(parts) < 2 or not _IDENTIFIER.fullmatch(parts[0]) or not parts[-1]:
        return None
    return parts[0], parts[-1]


def _text_form(atom: str) -> str | None:
    """Words and choice letters as bare lower-case text (``\\text{(C)}`` -> ``c``), else None."""
    text = _TEXT_WRAPPER.sub(r"\1", atom).lower()
    if not _TEXTLIKE.fullmatch(text):
        return None
    return text.strip("()").replace(" ", "").replace("'", "")


def _latex_oracle(latex: LatexChecker | None, rel_tol: float) -> Oracle:
    """Checks for one comparison, all of them within the checker's ``timeout`` together."""
    checker = latex or default_latex_checker()
    if not isinstance(checker, LatexChecker):
        return checker.equivalent  # any object with equivalent(gold, predicted), e.g. a test double
    deadline: list[float] = []

    def ask(gold: str, predicted: str) -> bool:
        if not deadline:  # the clock starts at the first check (after a cold start, if any)
            deadline.append(time.monotonic() + checker.timeout)
        remaining = deadline[0] - time.monotonic()
        if remaining <= 0:
            return False
        return checker.equivalent(gold, predicted, rel_tol=rel_tol, within=remaining)

    return ask


def _check_many(latex: LatexChecker | None, pairs: list[tuple[str, str]], rel_tol: float):
    checker = latex or default_latex_checker()
    if isinstance(checker, LatexChecker):
        return checker.equivalent_many(pairs, rel_tol)
    return [checker.equivalent(gold, predicted) for gold, predicted in pairs]


def _decide(predicted: str | None, gold: str, rel_tol: float, oracle: Oracle) -> bool:
    if predicted is None:
        return False
    p, g = normalise(predicted), normalise(str(gold))
    if p is None or g is None:
        return False
    if _depth(p) > MAX_NESTING or _depth(g) > MAX_NESTING:
        return p == g  # no answer nests this deep; only the identical string is the same
    return _Judge(rel_tol, oracle).same(p, g)


def _depth(text: str) -> int:
    depth = deepest = 0
    for c in text:
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "})]":
            depth -= 1
    return deepest


def is_equivalent(
    predicted: str | None,
    gold: str,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    latex: LatexChecker | None = None,
) -> bool:
    """Whether ``predicted`` (None = no answer) states the ``gold`` answer; never raises.

    ``latex`` is the checker for LaTeX answers (default: one shared per
    process); it is only started when an answer needs it.
    """
    try:
        return _decide(predicted, gold, rel_tol, _latex_oracle(latex, rel_tol))
    except RecursionError:
        return False


def chunks(items: Sequence, count: int) -> list[Sequence]:
    """``items`` in ``count`` contiguous pieces of (nearly) equal size."""
    size = max(1, -(-len(items) // count))
    return [items[i : i + size] for i in range(0, len(items), size)]


def first_round(pairs: Sequence[tuple[str | None, str]], rel_tol: float) -> list[bool | None]:
    """Each pair's verdict where no LaTeX check is needed, else None (runs in a pool process)."""
    out: list[bool | None] = []
    for predicted, gold in pairs:
        asked = [0]

        def oracle(gold_atom: str, predicted_atom: str) -> bool:
            asked[0] += 1
            return False

        try:
            verdict = _decide(predicted, gold, rel_tol, oracle)
        except RecursionError:
            verdict = False
        out.append(None if asked[0] else verdict)
    return out


def judge_many(
    predicted: Sequence[str | None],
    golds: Sequence[str],
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    latex: LatexChecker | None = None,
    processes: int = 1,
) -> list[bool]:
    """:func:`is_equivalent` for each pair, with the LaTeX checks of the whole batch run together.

    Equal pairs are judged once, and the checks the batch needs go to the
    checker's workers in parallel (in rounds: a set's later elements are
    only checked once its earlier ones are known). With ``processes`` > 1
    and at least :data:`PARALLEL_MIN_PAIRS` distinct pairs, the judging that
    needs no LaTeX runs in that many kept subprocesses (see ``parallel``).
    """
    pairs = list(zip(predicted, (str(g) for g in golds)))
    unique = list(dict.fromkeys(pairs))
    known: dict[tuple[str, str], bool] = {}
    decided: dict[tuple[str | None, str], bool] = {}
    pending = unique
    if processes > 1 and len(unique) >= PARALLEL_MIN_PAIRS:
        parts = chunks(unique, processes)
        verdicts = process_map(processes).map(first_round, [(part, rel_tol) for part in parts])
        pending = []
        for pair, verdict in zip(unique, (v for part in verdicts for v in part)):
            if verdict is None:
                pending.append(pair)
            else:
                decided[pair] = verdict
    for _ in range(MAX_LATEX_CHECKS + 1):
        missing: dict[tuple[str, str], None] = {}
        asked = [0]  # unknown checks the pair being decided asked for

        def oracle(gold: str, pred: str) -> bool:
            if (gold, pred) in known:
                return known[(gold, pred)]
            missing[(gold, pred)] = None
            asked[0] += 1
            return False

        waiting = []
        for pair in pending:
            asked[0] = 0
            try:
                verdict = _decide(pair[0], pair[1], rel_tol, oracle)
            except RecursionError:
                verdict = False
            if not asked[0]:
                decided[pair] = verdict
            else:
                waiting.append(pair)
        if not missing:
            break
        keys = list(missing)
        for key, value in zip(keys, _check_many(latex, keys, rel_tol)):
            known[key] = value
        pending = waiting
    for pair in pending:
        decided.setdefault(pair, False)
    return [decided[pair] for pair in pairs]


def canonical_answer(answer: str | None) -> str | None:
    """A key under which equal answers vote together: ``$1,080`` and ``1080.0`` -> ``1080``.

    Numbers (their unit dropped) are written exactly; ``x = 5`` votes with
    ``5``; anything else votes by its normal form.
    """
    text = normalise(answer)
    if text is None:
        return None
    assigned = _assignment(text)
    if assigned is not None and _structure(text).kind == "atom":
        text = assigned[1]
    core, _ = split_unit(text)
    number = read_number(core)
    if number is not None:
        if number.base is not None:
            return f"{'-' if number.value < 0 else ''}{number.digits}_{number.base}"
        return format_number(number.value)
    return text
