"""Calculator notes ``<<expr=value>>`` and whether the stated value is right.

GSM8K solutions annotate each computation with a note; a model trained on
them writes notes too. A note is consistent when the safe evaluator's exact
value of ``expr`` equals the stated value, allowing the stated value to be
rounded to the decimals it shows (``<<10/3=3.33>>``).
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

from rl_reason.rewards.arithmetic import try_evaluate
from rl_reason.rewards.numbers import parse_number

_NOTE = re.compile(r"<<([^<>\n]*)>>")
_DECIMALS = re.compile(r"\.(\d+)")


@dataclasses.dataclass(frozen=True)
class Note:
    end: int  # exclusive: the offset just after ``>>``
    expression: str
    stated: str  # the text after the last ``=``; empty if there is no ``=``


def find_notes(text: str) -> list[Note]:
    """Every calculator note in ``text``, in order."""
    notes = []
    for match in _NOTE.finditer(text):
        expression, _, stated = match.group(1).rpartition("=")
        notes.append(Note(match.end(), expression, stated.strip()))
    return notes


def stated_value(note: Note) -> Fraction | None:
    """The value the note claims, or None if it claims none."""
    return parse_number(note.stated) if note.expression else None


def is_consistent(note: Note) -> bool:
    """Whether the note's stated value is its expression's value (up to the shown rounding)."""
    stated = stated_value(note)
    computed = try_evaluate(note.expression) if stated is not None else None
    if computed is None:
        return False
    decimals = _DECIMALS.search(note.stated)
    tolerance = Fraction(1, 2 * 10 ** len(decimals.group(1))) if decimals else Fraction(0)
    return abs(computed - stated) <= tolerance
