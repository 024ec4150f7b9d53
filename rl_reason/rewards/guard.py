"""A cheap structural check that refuses LaTeX whose evaluation could explode.

sympy evaluates integer powers eagerly, so ``10^{10^{10}}`` asks for ten
billion digits and ``2^{2^{2^{2^{2^{2}}}}}`` for 2^65536; a deep brace nest
makes the LaTeX parser recurse for seconds. :func:`refusal` finds these by
reading the string once -- length, nesting depth, exponent towers, the size
of each power and factorial, operators that sum or integrate -- and names the
reason, in well under a millisecond, before anything reaches the worker.
A refused answer is not equivalent to anything. What it passes still runs
under the worker's time limit; this check only keeps the known explosions
from costing that limit (and a worker restart) each time.

The bounds are far above what a final answer needs: MATH answers are at
most a few dozen characters, nest a handful of braces deep, and have
exponents of a few digits.
"""

from __future__ import annotations

import math
import re

MAX_CHARS = 400  # characters of one normalised answer atom
MAX_DEPTH = 10  # nesting of {}, (), []
MAX_LITERAL_DIGITS = 300  # digits of one integer literal
MAX_POWER_DIGITS = 10_000  # digits of an integer power such as 2^{30000}
MAX_EXPONENT = 1000  # |exponent| of any other power (x^{1000}, \pi^{1000})
MAX_FACTORIAL = 1000  # n in n! and in \binom{n}{k}
MAX_TOWER_VALUE = 10**6  # an all-integer tower is evaluated while it stays below this
MAX_COMPOUND_EXPONENT = 30  # (x+1)^{30}: sympy expands sums' powers when it simplifies
MAX_EXPANSION_TERMS = 500  # terms of such an expansion, (x+y+z+1)^{n} having C(n+3, 3)

_FORBIDDEN = re.compile(
    r"\\(?:sum|prod|coprod|int|iint|iiint|oint|lim|limsup|liminf|bigcup|bigcap|sup|inf|max|min)"
    r"(?![A-Za-z])"
)
_DIGITS = re.compile(r"\d+")
_INT = re.compile(r"[-+]?\d+")
_BINOM = re.compile(r"\\[dt]?binom(?![A-Za-z])|\\choose(?![A-Za-z])")
_OPEN = "{(["
_CLOSE = "})]"


def _group_after(text: str, i: int) -> tuple[str, int]:
    """The argument starting at ``i`` (a braced group, a command or one character) and its end."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return "", i
    if text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j], j + 1
        return text[i + 1 :], len(text)
    if text[i] == "\\":
        j = i + 1
        while j < len(text) and text[j].isalpha():
            j += 1
        return text[i : max(j, i + 2)], max(j, i + 2)
    return text[i], i + 1


def _operand_before(text: str, i: int) -> str:
    """The operand ending just before ``i``: a digit run, a letter, or a bracketed group."""
    j = i - 1
    while j >= 0 and text[j] == " ":
        j -= 1
    if j < 0:
        return ""
    if text[j].isdigit():
        k = j
        while k >= 0 and text[k].isdigit():
            k -= 1
        return text[k + 1 : j + 1]
    if text[j] in _CLOSE:
        close, open_ = text[j], _OPEN[_CLOSE.index(text[j])]
        depth = 0
        for k in range(j, -1, -1):
            if text[k] == close:
                depth += 1
            elif text[k] == open_:
                depth -= 1
                if depth == 0:
                    return text[k : j + 1]
        return text[: j + 1]
    return text[j]


def _tower_value(exponent: str) -> int | None:
    """The value of an all-integer tower such as ``2^{3^{2}}``; None if not one or too big."""
    exponent = exponent.strip().strip("{}").strip()
    head, caret, rest = exponent.partition("^")
    if not _INT.fullmatch(head.strip("{}() ")):
        return None
    base = int(head.strip("{}() "))
    if not caret:
        return base
    power, end = _group_after(rest, 0)
    if rest[end:].strip():
        return None
    value = _tower_value(power)
    if value is None or abs(value) > MAX_TOWER_VALUE:
        return None
    if abs(base) > 1 and value * math.log10(abs(base)) > math.log10(MAX_TOWER_VALUE):
        return None
    return base**value if value >= 0 else None


def _is_compound(group: str) -> bool:
    """Whether a bracketed base holds more than a number (a letter, a command)."""
    return any(c.isalpha() or c == "\\" for c in group)


def _top_level_terms(text: str) -> int:
    depth, terms = 0, 1
    for i, c in enumerate(text):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif c in "+-" and depth == 0 and i > 0:
            terms += 1
    return terms


def _power_refusal(text: str, caret: int) -> str | None:
    exponent, _ = _group_after(text, caret + 1)
    base = _operand_before(text, caret)
    if "^" in exponent:
        value = _tower_value(exponent)
        if value is None:
            return "a tower of exponents"
        exponent = str(value)
    if not _INT.fullmatch(exponent.strip().strip("()")):
        return None  # x^{n}, 2^{\frac{1}{2}}: symbolic, nothing to evaluate eagerly
    power = abs(int(exponent.strip().strip("()")))
    if base[:1] in "({[" and _is_compound(base):
        terms = _top_level_terms(base[1:-1])
        if power > MAX_COMPOUND_EXPONENT or (
            terms > 2 and math.comb(power + terms - 1, terms - 1) > MAX_EXPANSION_TERMS
        ):
            return "a power of a sum whose expansion is too large"
    if base.isdigit():
        digits = math.log10(max(int(base[:20]), 2)) + max(len(base) - 20, 0)
        size = power * digits
        if size > MAX_POWER_DIGITS:
            return f"a power of more than {MAX_POWER_DIGITS} digits"
    elif power > MAX_EXPONENT:
        return f"an exponent above {MAX_EXPONENT}"
    return None


def refusal(latex: str) -> str | None:
    """Why ``latex`` is too costly to check (None: it may be checked, under the time limit)."""
    if len(latex) > MAX_CHARS:
        return f"longer than {MAX_CHARS} characters"
    depth = 0
    for c in latex:
        if c in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH}"
        elif c in _CLOSE:
            depth = max(depth - 1, 0)
    if match := _FORBIDDEN.search(latex):
        return f"uses {match.group()}"
    if any(len(d) > MAX_LITERAL_DIGITS for d in _DIGITS.findall(latex)):
        return f"a literal of more than {MAX_LITERAL_DIGITS} digits"
    for i, c in enumerate(latex):
        if c == "^":
            if reason := _power_refusal(latex, i):
                return reason
        elif c == "!" and (i == 0 or latex[i - 1] != "\\"):
            operand = _operand_before(latex, i).strip("{}()[] ")
            if "^" in operand or "!" in operand:
                return "a factorial of a power or factorial"
            if operand.isdigit() and int(operand) > MAX_FACTORIAL:
                return f"a factorial above {MAX_FACTORIAL}!"
    if _BINOM.search(latex) and any(int(d) > MAX_FACTORIAL for d in _DIGITS.findall(latex)):
        return f"a binomial coefficient above {MAX_FACTORIAL}"
    if latex.count("!") > 4:
        return "more than four factorials"
    return None
