"""The safe calculator: exact values, Python's precedence, hostile input rejected."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from work_counter import PythonLines, text_budget

from rl_reason.rewards import arithmetic
from rl_reason.rewards.arithmetic import CalculatorError, evaluate, try_evaluate


@pytest.mark.parametrize(
    "expr, value",
    [
        ("48/2", 24),
        ("0.2*50", 10),
        ("100-50-30-15", 5),
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("12/60", Fraction(1, 5)),
        ("10/3", Fraction(10, 3)),
        ("-2**2", -4),  # as in Python: power binds tighter than unary minus
        ("2**-1", Fraction(1, 2)),
        ("2**3**2", 512),  # right-associative
        ("2^10", 1024),
        ("7//2", 3),
        ("-7//2", -4),
        ("560//10", 56),
        (".5*4", 2),
        ("3.", 3),
        ("1,000*2", 2000),
        ("6×7÷2", 21),
        ("--3", 3),
        (" ( 1 + 2 ) ", 3),
        ("(-1)**100001", -1),
        ("0.1+0.2", Fraction(3, 10)),  # exact, no float error
    ],
)
def test_values(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "1/0",
        "1//0",
        "0**-1",
        "2**0.5",
        "9**9**9",
        "2**10000",
        "10**200*10**200",
        "(" * 40 + "1" + ")" * 40,
        "-" * 40 + "1",
        "9" * 41,
        "1" * 300,
        "1e5",
        "2*(3",
        "2*3)",
        "2 3",
        "abs(1)",
        "__import__('os')",
        "1;2",
    ],
)
def test_rejected(expr):
    with pytest.raises(CalculatorError):
        evaluate(expr)
    assert try_evaluate(expr) is None


def test_bounds_are_the_documented_ones():
    assert evaluate("9" * arithmetic.MAX_LITERAL_DIGITS) == int("9" * arithmetic.MAX_LITERAL_DIGITS)
    assert evaluate("(" * arithmetic.MAX_DEPTH + "1" + ")" * arithmetic.MAX_DEPTH) == 1
    assert evaluate(f"2**{arithmetic.MAX_BITS - 1}") == 2 ** (arithmetic.MAX_BITS - 1)
    assert try_evaluate(f"2**{arithmetic.MAX_BITS}") is None


def _trees(max_leaves=8):
    """Random well-formed expressions with their exact values, computed independently."""
    leaf = st.integers(0, 999).map(lambda n: (str(n), Fraction(n)))

    def combine(children):
        def build(pair):
            (a, va), (b, vb), op = pair
            if op == "/" and vb == 0:
                op = "+"
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
            return f"({a}{op}{b})", value

        return st.tuples(children, children, st.sampled_from("+-*/")).map(build)

    return st.recursive(leaf, combine, max_leaves=max_leaves)


@settings(max_examples=300, deadline=None)
@given(_trees())
def test_agrees_with_exact_arithmetic(tree):
    text, value = tree
    assert evaluate(text) == value


_HOSTILE_PIECES = ["9" * 30, "**", "^", "(", ")", "-", "/", "//", "*", "0", ".", "1,000", " ", "="]


@pytest.mark.timeout(120)  # a hang guard, not a speed assertion
@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300), st.lists(st.sampled_from(_HOSTILE_PIECES), max_size=200).map("".join)
    )
)
def test_never_raises_anything_else_and_does_bounded_work(expr):
    value = PythonLines(budget=text_budget(expr))(try_evaluate, expr)
    if value is not None:  # anything accepted is within the size bound
        assert (
            max(value.numerator.bit_length(), value.denominator.bit_length()) <= arithmetic.MAX_BITS
        )


@pytest.mark.timeout(120)  # a hang guard, not a speed assertion
@settings(max_examples=50, deadline=None)
@given(st.integers(2, 9), st.integers(3, 12))
def test_power_towers_are_rejected(base, height):
    tower = "**".join([str(base) * 3] * height)
    assert PythonLines(budget=text_budget(tower))(try_evaluate, tower) is None
