"""Exact values of normalised answer atoms, read without a symbolic engine.

An atom (one element of an answer, already through :func:`normalise`) is
read here when it is a number in one of the forms answers use: an integer,
a decimal, ``a/b``, ``\\frac{a}{b}`` (signs inside or out), a mixed number
``2\\frac{1}{3}`` (= 7/3, the MATH convention), or a numeral in a base,
``4210_{5}`` / ``4210_5``. A trailing unit, ``\\text{inches}^3``, is split off
and kept. Values are exact ``Fraction``s; whether the number was *written*
as a decimal is kept too, since only a written decimal can be a rounding.
Radicals, powers and everything else are left to the LaTeX checker.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

MAX_DIGITS = 400  # a longer numeral is not an answer

_DEC = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SIGNED = rf"[-+]?{_DEC}"
_PLAIN = re.compile(rf"(?P<sign>[-+]?)(?P<num>{_DEC})(?:/(?P<den>{_DEC}))?")
_FRAC = re.compile(
    rf"(?P<sign>[-+]?)(?P<whole>\d+)?\\frac\{{(?P<num>{_SIGNED})\}}\{{(?P<den>{_SIGNED})\}}"
)
_BASED = re.compile(
    r"(?P<sign>-?)(?:\\text\{(?P<tdigits>[0-9a-z]+)\}|(?P<digits>[0-9A-Za-z]+))"
    r"_(?:\{(?:\\text\{)?(?P<base1>\d+)\}?\}|(?P<base2>\d))"
)
_UNIT = re.compile(r"(?P<core>.*?)(?P<unit>(?:\\text\{[^{}]*\})+(?:\^\{?\d\}?)?)")
_IRREGULAR = {"feet": "foot", "inches": "inch", "teeth": "tooth", "people": "person"}


@dataclasses.dataclass(frozen=True)
class Number:
    value: Fraction
    written_decimal: bool = False  # "0.3333" may be a rounding; "1/3" and "7" are not
    base: int | None = None  # 5 for 4210_{5}
    digits: str | None = None  # "4210" for 4210_{5}


def _singular(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    sibilant = len(word) > 3 and word.endswith("es") and word[-3] in "sxz"
    if sibilant or word.endswith(("ches", "shes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def normal_unit(unit: str) -> str:
    """``\\text{ Square Inches}^2`` -> ``square inch^2``: words singular and lower-case."""
    power = re.search(r"\^\{?(\d)\}?$", unit)
    words = re.sub(r"\\text\{([^{}]*)\}|\^\{?\d\}?$", r" \1 ", unit).replace("\\", " ")
    words = re.sub(r"[^a-z0-9/^ ]", " ", words.lower())
    text = " ".join(_singular(w) for w in words.split())
    return text + (f"^{power.group(1)}" if power else "")


def split_unit(atom: str) -> tuple[str, str | None]:
    """``864\\text{inches}^3`` -> (``864``, ``inch^3``); the core alone when there is no unit."""
    match = _UNIT.fullmatch(atom)
    if match is None or not match["core"]:
        return atom, None
    return match["core"], normal_unit(match["unit"]) or None


def _digit_value(c: str) -> int:
    return int(c) if c.isdigit() else ord(c.lower()) - ord("a") + 10


def read_number(core: str) -> Number | None:
    """The exact number ``core`` states (no unit), or None if it is not one of the simple forms."""
    if len(core) > MAX_DIGITS or not core:
        return None
    if match := _PLAIN.fullmatch(core):
        value = Fraction(match["num"])
        decimal = "." in match["num"]
        if match["den"] is not None:
            den = Fraction(match["den"])
            if den == 0:
                return None
            value /= den
            decimal = decimal or "." in match["den"]
        return Number(-value if match["sign"] == "-" else value, decimal)
    if match := _FRAC.fullmatch(core):
        num, den = Fraction(match["num"]), Fraction(match["den"])
        if den == 0:
            return None
        value = num / den
        if match["whole"] is not None:
            if value < 0:  # "2\frac{-1}{3}" is no mixed number
                return None
            value += int(match["whole"])
        decimal = "." in match["num"] + match["den"]
        return Number(-value if match["sign"] == "-" else value, decimal)
    if match := _BASED.fullmatch(core):
        digits = (match["digits"] or match["tdigits"]).lstrip("0") or "0"
        base = int(match["base1"] or match["base2"])
        if not 2 <= base <= 36 or any(_digit_value(c) >= base for c in digits):
            return None
        value = Fraction(int(digits, base))
        return Number(-value if match["sign"] else value, False, base, digits.lower())
    return None


def terminates(value: Fraction) -> bool:
    """Whether ``value`` has a finite decimal expansion (its denominator is 2^a 5^b)."""
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    return den == 1
