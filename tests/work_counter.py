"""A bound on the work a call does, counted, not timed.

Tests bound what untrusted input may make a reader or a checker do. A wall-time
bound fails on a loaded machine and passes a quadratic loop on a fast one; the
number of Python lines a call executes is the same on every machine. C-level
work is not counted: pair this with a memory bound (tracemalloc) where a call
could loop inside a library.
"""

import sys


class WorkBudgetExceeded(BaseException):
    """Raised inside the traced call once it passes its budget (a BaseException, so no
    reader's ``except Exception`` can take it for a format error and go on)."""


class PythonLines:
    """Counts the Python lines each call executes (``sys.settrace``), and stops a call at
    ``budget`` lines: a runaway loop ends as a failure instead of a hang."""

    def __init__(self, budget: int):
        self.budget = budget
        self.lines = 0  # of the last call
        self.most = 0  # of any call so far

    def __call__(self, fn, *args, **kwargs):
        self.lines = 0
        previous = sys.gettrace()
        sys.settrace(self._on_call)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(previous)
            self.most = max(self.most, self.lines)

    def _on_call(self, frame, event, arg):
        return self._on_line

    def _on_line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines > self.budget:
                raise WorkBudgetExceeded(f"over {self.budget} Python lines")
        return self._on_line


# A text reader's budget (extraction, number parsing, the calculator, the equivalence
# pre-check): a constant plus a linear term. Measured on these tests' hypothesis inputs,
# the worst call used under a fifth of it; a quadratic scan of a 1,000-character text
# would not fit.
TEXT_LINES = 10_000
TEXT_LINES_PER_CHAR = 50


def text_budget(*texts: str) -> int:
    """The Python-line budget of one call that reads ``texts``."""
    return TEXT_LINES + TEXT_LINES_PER_CHAR * sum(len(t) for t in texts if t)
