"""Reading answers as exact numbers and writing numbers back."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from work_counter import PythonLines, text_budget

from rl_reason.rewards.numbers import MAX_NUMBER_CHARS, format_number, parse_number


@pytest.mark.parametrize(
    "text, value",
    [
        ("72", 72),
        ("  42  ", 42),
        ("1,080", 1080),
        ("$1,080", 1080),
        ("10,000,000", 10_000_000),
        ("-3", -3),
        ("-$5", -5),
        ("$-5", -5),
        ("25%", 25),
        ("3.50", Fraction(7, 2)),
        (".5", Fraction(1, 2)),
        ("18.", 18),
        ("3/4", Fraction(3, 4)),
        ("18 dollars", 18),
        ("7 km/h.", 7),
        ("0.5 cups", Fraction(1, 2)),
        ("(5)", 5),
        ("$18$", 18),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\dfrac{1}{2}", Fraction(-1, 2)),
        ("\\$18\\text{ apples}", 18),
        ("50\\%", 50),
        ("1{,}000", 1000),
    ],
)
def test_reads(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "five",
        "1/0",
        "18 because 3",
        "1e5",
        "+-5",
        "1, 2",
        "\\boxed{5}",
        "x = 5",
        "5!",
        "1" * 101,
    ],
)
def test_refuses(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    "value, text",
    [
        (Fraction(12), "12"),
        (Fraction(-7), "-7"),
        (Fraction(0), "0"),
        (Fraction(1, 4), "0.25"),
        (Fraction(-1, 4), "-0.25"),
        (Fraction(25, 2), "12.5"),
        (Fraction(1, 1000), "0.001"),
        (Fraction(11, 3), "11/3"),
        (Fraction(-11, 3), "-11/3"),
    ],
)
def test_formats(value, text):
    assert format_number(value) == text


@settings(max_examples=300, deadline=None)
@given(st.fractions(max_denominator=10**6).filter(lambda f: abs(f) < 10**12))
def test_format_then_parse_is_identity(value):
    assert parse_number(format_number(value)) == value


@pytest.mark.timeout(120)  # a hang guard, not a speed assertion
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2 * MAX_NUMBER_CHARS))
def test_never_raises(text):
    value = PythonLines(budget=text_budget(text))(parse_number, text)
    assert value is None or isinstance(value, Fraction)
