"""Answer equivalence: numbers with tolerance, LaTeX through a time-limited worker."""

from fractions import Fraction

import pytest

from rl_reason.rewards.equivalence import canonical_answer, is_equivalent, numbers_equal
from rl_reason.rewards.latex import MAX_ANSWER_CHARS, LatexChecker


class _NoLatex:
    """Fails the test if a comparison that numbers can settle reaches the worker."""

    def equivalent(self, gold, predicted):
        raise AssertionError(f"unexpected LaTeX check of {gold!r} vs {predicted!r}")


@pytest.mark.parametrize(
    "a, b, equal",
    [
        (Fraction(1000000), Fraction(1000001), False),  # whole numbers: exact
        (Fraction(18), Fraction(18), True),
        (Fraction(3333, 10000), Fraction(1, 3), True),  # within 1e-4 relative
        (Fraction(33, 100), Fraction(1, 3), False),
        (Fraction(-5, 2), Fraction(5, 2), False),
        (Fraction(0), Fraction(1, 10**9), False),
    ],
)
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal
    assert numbers_equal(b, a) is equal


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("$1,080", "1080", True),
        ("1080.00", "1080", True),
        ("25%", "25", True),
        ("18 dollars", "18", True),
        ("\\frac{1}{2}", "0.5", True),
        ("0.3333", "1/3", True),
        ("17", "18", False),
        (None, "18", False),
        ("", "18", False),
        ("eighteen", "18", False),
        ("Yes", " yes ", True),  # plain text: case and spacing ignored
    ],
)
def test_is_equivalent_without_latex(predicted, gold, equal):
    assert is_equivalent(predicted, gold, latex=_NoLatex()) is equal


def test_canonical_answer_groups_equal_numbers():
    assert canonical_answer("$1,080") == canonical_answer("1080.0") == "1080"
    assert canonical_answer("\\frac{1}{4}") == canonical_answer(".25") == "0.25"
    assert canonical_answer("  Blue  Whale ") == "blue whale"
    assert canonical_answer(None) is None
    assert canonical_answer("   ") is None


@pytest.fixture(scope="module")
def checker():
    with LatexChecker(timeout=10.0) as latex:  # generous: correctness, not speed, is tested
        yield latex


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("\\sqrt{4}", "2", True),
        ("x^2+1", "1+x^2", True),
        ("\\frac{2}{4}", "\\dfrac{1}{2}", True),
        ("2^{10}", "1024", True),
        ("\\sqrt{2}", "2", False),
        ("\\frac{", "}}", False),
        ("\ud800\\x", "1", False),  # a lone surrogate survives the trip
    ],
)
def test_latex_answers(checker, predicted, gold, equal):
    assert is_equivalent(predicted, gold, latex=checker) is equal


def test_overrunning_worker_is_killed_and_replaced():
    with LatexChecker(timeout=1.0) as checker:
        assert checker.equivalent("1", "1")
        worker = checker._proc
        # sympy runs for minutes on this; the worker gets one second.
        assert not checker.equivalent("9^{9^{9^{9^{9}}}}", "10^{10^{10^{10}}}")
        assert worker.poll() is not None  # the overrunning worker is dead
        checker.timeout = 10.0
        assert checker.equivalent("\\sqrt{4}", "2")  # and a fresh one answers
    assert checker._proc is None


def test_overlong_answers_are_not_sent(checker):
    long_answer = "1+" * MAX_ANSWER_CHARS + "1"
    assert not checker.equivalent(long_answer, long_answer)
