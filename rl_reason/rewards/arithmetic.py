"""A safe, exact evaluator for calculator notes such as ``<<48/2=24>>``.

Model output is untrusted, so this is a small recursive-descent parser over
``+ - * / // ** ^ ( )`` and decimal literals -- never ``eval`` -- with exact
``Fraction`` arithmetic and hard bounds on input length, literal length,
nesting depth and the size of every intermediate value. Anything outside the
bounds is rejected with :class:`CalculatorError` before any expensive work,
so a hostile note (``9**9**9``, ten thousand parentheses, a million digits)
costs microseconds.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

MAX_LENGTH = 256  # characters in an expression
MAX_LITERAL_DIGITS = 40
MAX_DEPTH = 32  # nested parentheses and unary signs
MAX_BITS = 512  # numerator and denominator of every intermediate value

_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)|(?P<op>\*\*|//|[-+*/^()×÷]))"
)
_ALIASES = {"^": "**", "×": "*", "÷": "/"}


class CalculatorError(ValueError):
    """The expression is malformed, out of bounds, or divides by zero."""


@dataclasses.dataclass(frozen=True)
class Number:
    value: Fraction


@dataclasses.dataclass(frozen=True)
class Negate:
    operand: Node


@dataclasses.dataclass(frozen=True)
class BinaryOp:
    op: str  # one of + - * / // **
    left: Node
    right: Node


Node = Number | Negate | BinaryOp


def _tokenize(expr: str) -> list[str]:
    if len(expr) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    tokens, pos, end = [], 0, len(expr.rstrip())
    while pos < end:
        match = _TOKEN.match(expr, pos)
        if not match:
            raise CalculatorError(f"unexpected character at {pos}: {expr[pos : pos + 10]!r}")
        number, op = match.group("number"), match.group("op")
        if number is not None and sum(c.isdigit() for c in number) > MAX_LITERAL_DIGITS:
            raise CalculatorError(f"literal longer than {MAX_LITERAL_DIGITS} digits")
        tokens.append(number if number is not None else _ALIASES.get(op, op))
        pos = match.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/'|'//') unary)*;
    unary := ('+'|'-') unary | power; power := atom ('**' unary)?;
    atom := number | '(' expr ')'.  (So ``-2**2 == -4`` and ``2**-1 == 1/2``.)
    """

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def parse(self) -> Node:
        node = self.expr()
        if self.pos != len(self.tokens):
            raise CalculatorError(f"unexpected {self.tokens[self.pos]!r}")
        return node

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalculatorError("unexpected end of expression")
        self.pos += 1
        return token

    def nested(self, parse):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"nested deeper than {MAX_DEPTH}")
        node = parse()
        self.depth -= 1
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = BinaryOp(self.take(), node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek() in ("*", "/", "//"):
            node = BinaryOp(self.take(), node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek() in ("+", "-"):
            sign = self.take()
            operand = self.nested(self.unary)
            return Negate(operand) if sign == "-" else operand
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            return BinaryOp("**", base, self.nested(self.unary))
        return base

    def atom(self) -> Node:
        token = self.take()
        if token == "(":
            node = self.nested(self.expr)
            if self.take() != ")":
                raise CalculatorError("unbalanced parenthesis")
            return node
        if token[0].isdigit() or token[0] == ".":
            return Number(Fraction(token.replace(",", "")))
        raise CalculatorError(f"unexpected {token!r}")


def parse(expr: str) -> Node:
    """The syntax tree of ``expr``; raises :class:`CalculatorError` if malformed or too big."""
    return _Parser(_tokenize(expr)).parse()


def _bounded(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise CalculatorError(f"intermediate value exceeds {MAX_BITS} bits")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only whole-number exponents are supported")
    n = abs(exponent.numerator)
    if base == 0 and exponent < 0:
        raise CalculatorError("zero to a negative power")
    if base in (0, 1):
        return base
    if base == -1:
        return Fraction(-1 if n % 2 else 1)
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if n * (bits - 1) + 1 > MAX_BITS:  # a lower bound on the result's size
        raise CalculatorError(f"power exceeds {MAX_BITS} bits")
    return base**exponent.numerator


def evaluate_tree(node: Node) -> Fraction:
    """The exact value of a syntax tree, every intermediate value bounded."""
    if isinstance(node, Number):
        return _bounded(node.value)
    if isinstance(node, Negate):
        return -evaluate_tree(node.operand)
    left, right = evaluate_tree(node.left), evaluate_tree(node.right)
    if node.op == "+":
        return _bounded(left + right)
    if node.op == "-":
        return _bounded(left - right)
    if node.op == "*":
        return _bounded(left * right)
    if node.op in ("/", "//"):
        if right == 0:
            raise CalculatorError("division by zero")
        return _bounded(left / right if node.op == "/" else Fraction(left // right))
    return _bounded(_power(left, right))


def evaluate(expr: str) -> Fraction:
    """The exact value of ``expr``; raises :class:`CalculatorError` when rejected."""
    return evaluate_tree(parse(expr))


def try_evaluate(expr: str) -> Fraction | None:
    """The exact value of ``expr``, or None when it is rejected."""
    try:
        return evaluate(expr)
    except CalculatorError:
        return None
