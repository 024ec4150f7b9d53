"""Answer equivalence: exact numbers, structures, units, bases; LaTeX in time-limited workers."""

from fractions import Fraction

import pytest
from answer_pairs import ISSUE_14, PAIRS
from work_counter import PythonLines

from rl_reason.rewards.equivalence import (
    canonical_answer,
    is_equivalent,
    judge_many,
    numbers_equal,
)
from rl_reason.rewards.extraction import extract_answer
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
        (Fraction(3333, 10000), Fraction(1, 3), True),  # a rounding of 1/3, within 1e-4
        (Fraction(33, 100), Fraction(1, 3), False),
        (Fraction(35626, 100000), Fraction(35625, 100000), False),  # two finite decimals: exact
        (Fraction(10001, 10), Fraction(1000), False),
        (Fraction(1, 3), Fraction(100001, 300000), False),  # neither terminates: exact
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
        ("x = 5", "5", True),
        ("(1, 2)", "(1,2)", True),
        ("1000.1", "1000", False),
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


@pytest.mark.parametrize("predicted, gold, equal, kind", ISSUE_14)
def test_issue_14_examples(checker, predicted, gold, equal, kind):
    assert is_equivalent(predicted, gold, latex=checker) is equal


def test_issue_14_extraction_drops_dollars(checker):
    answer = extract_answer("The answer is $x=5$.")
    assert answer == "x=5"
    assert is_equivalent(answer, "x=5", latex=checker)
    assert extract_answer("The answer is: $18.50.") == "$18.50"  # a lone $ is currency


@pytest.mark.parametrize(
    "predicted, gold, equal, kind", PAIRS, ids=[f"{k}-{i}" for i, (*_, k) in enumerate(PAIRS)]
)
def test_math_answer_conventions(checker, predicted, gold, equal, kind):
    assert is_equivalent(predicted, gold, latex=checker) is equal


def test_table_covers_every_class_both_ways():
    assert len(PAIRS) >= 100
    classes = {kind for *_, kind in PAIRS}
    for kind in classes:
        assert {equal for _, _, equal, k in PAIRS if k == kind} == {True, False}, kind
    assert {"fractions", "radicals", "intervals", "tuples", "degrees", "percentages", "bases",
            "units", "text", "matrices"} <= classes  # fmt: skip


def test_judge_many_agrees_with_one_at_a_time(checker):
    rows = ISSUE_14 + PAIRS
    predicted = [p for p, *_ in rows] + [None, "x^2+1"]
    golds = [g for _, g, *_ in rows] + ["1", "1+x^2"]
    expected = [e for _, _, e, _ in rows] + [False, True]
    assert judge_many(predicted, golds, latex=checker) == expected


# Refusing a hostile answer is a scan of its text: at most this many Python lines
# a character, plus a constant (measured: under 5 a character, about 3,100 in all for
# the first call, which compiles the patterns). A counted bound, the same on every machine.
REFUSAL_LINES_PER_CHAR = 8
REFUSAL_LINES = 5_000

HOSTILE = [
    "10^{10^{10}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "{" * 300 + "1" + "}" * 300,
    "(" * 400 + "1" + ")" * 400,
    "\\frac{" * 100 + "1" + "}{2}" * 100,
    "2^{99999999}",
    "99999!",
    "(10^{10})!",
    "\\sum_{i=1}^{10^{9}} i",
    "\\binom{100000}{50000}",
    "9" * 5000,
    "e^{e^{e^{100}}}",
    "(x+y+z+1)^{20}",
    "(x+1)^{999}",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_latex_is_refused_before_the_worker(text):
    class _NoLatex:
        def equivalent(self, gold, predicted):
            raise AssertionError(f"{predicted!r} reached the LaTeX worker")

    lines = PythonLines(budget=REFUSAL_LINES_PER_CHAR * len(text) + REFUSAL_LINES)
    assert not lines(is_equivalent, text, "1", latex=_NoLatex())
    assert not lines(is_equivalent, "1", text, latex=_NoLatex())  # within budget: a linear scan


def test_small_towers_and_powers_still_reach_the_checker(checker):
    assert is_equivalent("2^{2^{2}}", "16", latex=checker)
    assert is_equivalent("2^{100}", "1267650600228229401496703205376", latex=checker)
    assert is_equivalent("5!", "120", latex=checker)


def test_overrunning_worker_is_killed_and_replaced_in_the_background():
    with LatexChecker(timeout=0.5, workers=2) as checker:
        checker.start()
        first = set(checker.pids)
        # Passes the structural check, but sympy expands it for far longer than 0.5 s.
        hostile = "(x+y+z+1)^{60}"
        assert not checker.equivalent(hostile, "(1+x+y+z)^{61}")
        # Cut off at the limit (not answered late), without waiting for the replacement.
        assert checker.stats.timeouts == 1 and checker.stats.restarts == 1
        assert checker.stats.waits_for_a_start == 0
        assert len(first - set(checker.pids)) == 1  # the overrunning worker is gone
        checker.timeout = 10.0  # room to wait for a restart, were there one to wait for
        assert checker.equivalent("\\sqrt{4}", "2")  # a ready worker answers at once:
        assert checker.stats.waits_for_a_start == 0  # no wait for the restarting one
    assert checker.pids == []


def test_checks_run_on_every_worker_at_once():
    with LatexChecker(timeout=0.5, workers=2) as checker:
        checker.start()
        results = checker.equivalent_many([("(x+y+z+1)^{60}", "(1+x+y+z)^{61}")] * 2)
    assert results == [False, False] and checker.stats.timeouts == 2
    assert checker.stats.most_at_once == 2  # two overruns side by side, not one after the other


def test_overlong_answers_are_not_sent(checker):
    long_answer = "1+" * MAX_ANSWER_CHARS + "1"
    assert not checker.equivalent(long_answer, long_answer)


def test_answered_pairs_are_remembered_and_an_overrun_is_refused_at_once():
    with LatexChecker(timeout=0.5) as checker:
        checker.start()
        assert checker.equivalent("\\sqrt{4}", "2")
        assert checker.equivalent("\\sqrt{4}", "2") and checker.stats.cached == 1
        assert not checker.equivalent("(x+y+z+1)^{60}", "(1+x+y+z)^{61}")
        assert checker.stats.timeouts == 1 and checker.stats.cached == 1
        for _ in range(3):  # answered from memory: no worker is asked again, none overruns
            assert not checker.equivalent("(x+y+z+1)^{60}", "(1+x+y+z)^{61}")
        assert checker.stats.timeouts == 1 and checker.stats.cached == 4
        assert checker.stats.restarts == 1


def test_a_check_cut_short_by_within_is_not_remembered():
    with LatexChecker(timeout=5.0) as checker:
        checker.start()
        assert not checker.equivalent("(x+y+z+1)^{60}", "(1+x+y+z)^{61}", within=0.3)
        assert not checker.equivalent("(x+y+z+1)^{60}", "(1+x+y+z)^{61}", within=0.3)
        assert checker.stats.cached == 0 and checker.stats.timeouts == 2
