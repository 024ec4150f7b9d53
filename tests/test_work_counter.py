"""The work counter the hostile-input tests bound calls with: it counts, and it stops."""

import pytest
from work_counter import PythonLines, WorkBudgetExceeded, text_budget


def _scan(text):  # linear: what a refusal check may do
    return sum(c == "{" for c in text)


def _pairs(text):  # quadratic: what it must not
    return sum(a == b for a in text for b in text)


def test_a_linear_scan_fits_the_text_budget_and_a_quadratic_one_does_not():
    text = "{" * 2_000
    lines = PythonLines(text_budget(text))
    assert lines(_scan, text) == 2_000 and lines.lines < text_budget(text)
    with pytest.raises(WorkBudgetExceeded):
        lines(_pairs, text)
    assert lines.most > text_budget(text)


def test_a_runaway_loop_is_stopped_at_its_budget_not_left_to_hang():
    def forever():
        while True:
            try:
                pass
            except Exception:  # noqa: BLE001, S112 - a reader's catch-all does not take the stop
                continue

    with pytest.raises(WorkBudgetExceeded):
        PythonLines(10_000)(forever)
