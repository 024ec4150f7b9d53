"""A solution's steps: its non-blank lines, with their character spans.

Dense rewards are paid at the end of a step, so each step carries the
offset of its last character (exclusive) in the completion.
"""

from __future__ import annotations

import dataclasses
import re

_LINE = re.compile(r"[^\n]+")


@dataclasses.dataclass(frozen=True)
class Step:
    end: int  # exclusive: the offset just after the step's last character
    text: str


def split_steps(text: str) -> list[Step]:
    """The non-blank lines of ``text``, in order."""
    return [Step(m.end(), m.group()) for m in _LINE.finditer(text) if not m.group().isspace()]
