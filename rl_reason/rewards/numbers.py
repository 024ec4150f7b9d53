"""Reading and writing the numbers that final answers are made of.

Answers arrive as ``$1,080``, ``25%``, ``18 dollars``, ``-3.50``, ``3/4`` or
simple LaTeX such as ``\\frac{3}{4}`` or ``\\$18\\text{ apples}``; all of these
are read here without a symbolic engine, exactly, as ``Fraction``. Anything
else is left to the LaTeX checker.
"""

from __future__ import annotations

import re
from fractions import Fraction

# Relative tolerance for a written decimal against a value it can only round
# (1/3, sqrt(2), pi); exact values are always compared exactly. Config key:
# rewards.<name>.rel_tol (Correctness, StepMatch) and evaluation's rel_tol.
DEFAULT_REL_TOL = 1e-4
MAX_NUMBER_CHARS = 100  # longer "numbers" are not answers; refuse rather than parse

_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_UNIT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")
_LATEX_NOISE = re.compile(r"\\[$%,!;: ]|\\left|\\right|\{,\}|^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER = re.compile(
    rf"(?P<sign>[-+]?)\s*\$?\s*(?P<sign2>[-+]?)\s*(?P<num>{_DECIMAL})"
    rf"(?:\s*/\s*(?P<den>{_DECIMAL}))?\s*%?\s*(?P<unit>[^\d\s][^\d]*)?"
)
_UNIT = re.compile(r"[A-Za-z][A-Za-z '/.-]*\.?|\.")


def parse_number(text: str) -> Fraction | None:
    """The number ``text`` states, or None if it is not (just) a number.

    Commas between digits are dropped, ``$`` and ``%`` ignored (GSM8K writes
    ``25`` for 25%), a trailing unit word allowed, ``a/b`` and ``\\frac{a}{b}``
    read as fractions.
    """
    if len(text) > MAX_NUMBER_CHARS:
        return None
    text = _LATEX_UNIT.sub(" ", text.strip())
    text = _LATEX_FRAC.sub(r"(\1)/(\2)", text)
    text = _LATEX_NOISE.sub("", text.strip()).strip()
    text = _DIGIT_COMMA.sub("", text.replace("(", "").replace(")", ""))
    match = _NUMBER.fullmatch(text)
    if not match or (match["sign"] and match["sign2"]):
        return None
    if match["unit"] and not _UNIT.fullmatch(match["unit"].strip()):
        return None
    value = Fraction(match["num"])
    if match["den"] is not None:
        denominator = Fraction(match["den"])
        if denominator == 0:
            return None
        value /= denominator
    return -value if "-" in (match["sign"], match["sign2"]) else value


def format_number(value: Fraction) -> str:
    """The shortest exact text for ``value``: ``12``, ``-0.25``, or ``11/3`` if not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"
