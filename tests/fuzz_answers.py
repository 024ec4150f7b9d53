"""Seeded generators of hostile strings for the reward property tests and benchmarks.

Random Unicode (lone surrogates included), exponent towers, brace nests,
huge digit strings, float extremes (``1e308``), and random LaTeX assembled
from the pieces answers are made of, bare or wrapped the ways completions
state answers.
"""

import random

PIECES = [
    "\\frac{", "\\dfrac", "\\sqrt{", "\\sqrt[3]{", "^", "_", "{", "}", "(", ")", "[", "]",
    "\\left(", "\\right)", "\\{", "\\}", "\\text{", "\\mbox{ inches}", "\\begin{pmatrix}",
    "\\end{pmatrix}", "&", "\\\\", "$", "\\boxed{", "=", "\\in", "\\cup", ",", "!", "\\binom",
    "\\pi", "\\infty", "i", "x", "y", "-", "+", "\\cdot", "\\times", "\\%", "^\\circ", ".",
    "0", "1", "2", "7", "9", "10", "99", "1,000", "0.5", "e", "1e308", " ", "\\,", "\\!",
    "_{5}", "_6", "\\sum", "\\int", "\\lim", "\\pm", "\\le", "<", "or", "\\ldots", "°",
]  # fmt: skip
GOLDS = [
    "18", "\\frac{1}{2}", "2\\sqrt{2}", "[2,5)", "(1,2)", "\\{1,2\\}", "x=5", "30^\\circ",
    "25\\%", "4210_{5}", "864 \\mbox{ inches}^2", "\\text{(C)}", "6-5i", "\\pi", "0.5",
    "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "x^2+1", "-\\frac{2}{3}", "1,080", "\\emptyset",
]  # fmt: skip


def _unicode(rng: random.Random) -> str:
    size = rng.randint(0, 200)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0xD800, 0xDFFF), (0x1F300, 0x1FAFF), (0, 0x10FFFF)]
    out = []
    for _ in range(size):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _tower(rng: random.Random) -> str:
    height = rng.randint(2, 12)
    base = rng.choice(["2", "9", "10", "99", "x", "e", "\\pi", "1.5", "(1+x)"])
    text = base
    for _ in range(height - 1):
        exponent = rng.choice(["2", "9", "10", "99", "999999", "n", "-1"])
        text = f"{exponent}^{{{text}}}" if rng.random() < 0.3 else f"{base}^{{{text}}}"
    return text


def _nest(rng: random.Random) -> str:
    depth = rng.randint(5, 3000)
    opener, closer = rng.choice([("{", "}"), ("(", ")"), ("[", "]"), ("\\frac{", "}{2}"),
                                 ("\\sqrt{", "}"), ("\\left(", "\\right)")])  # fmt: skip
    closed = rng.random() < 0.7
    return opener * depth + "1" + (closer * depth if closed else "")


def _digits(rng: random.Random) -> str:
    n = rng.choice([50, 400, 5000, 100_000])
    digits = "".join(rng.choice("0123456789") for _ in range(min(n, 1000)))
    digits = (digits * (n // len(digits) + 1))[:n]
    return rng.choice(["", "-", "0.", "\\frac{1}{"]) + digits + rng.choice(["", "}", "!", "^{9}"])


def _floats(rng: random.Random) -> str:
    return rng.choice(["1e308", "-1e308", "1e-308", "1e99999", "1.7976931348623157e308",
                       "inf", "nan", "-0", "0.0000000000000000000001", "10^{308}",
                       "10^{-308}", "\\frac{1}{0}", "0/0", "1/0"])  # fmt: skip


def _latex(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40)))


def _wrapped(rng: random.Random, answer: str) -> str:
    template = rng.choice(["{}", "The answer is {}.", "\\boxed{{{}}}", "#### {}",
                           "So $\\boxed{{{}}}$", "The answer is ${}$.",
                           "steps 1+1=2\n{}"])  # fmt: skip
    return template.format(answer)


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    """``n`` hostile strings, the same ones for the same seed."""
    rng = random.Random(seed)
    makers = [_unicode, _tower, _nest, _digits, _floats, _latex, _latex, _latex]
    out = []
    for _ in range(n):
        text = rng.choice(makers)(rng)
        if rng.random() < 0.5:
            text = _wrapped(rng, text)
        out.append(text)
    return out
