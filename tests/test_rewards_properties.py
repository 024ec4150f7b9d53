"""No reward function raises or stalls on any string a model can write.

These run the real LaTeX checker (worker processes with the default 1 s limit),
not a stand-in: hostile LaTeX must be refused by the structural check or cut
off by the limit. Every call's work is bounded by count, not by a clock: the
Python lines it runs (a budget linear in its text) and the LaTeX checks it
sends (at most MAX_LATEX_CHECKS a comparison, each under the checker's limit,
which tests/test_rewards_equivalence.py shows cut off). A timeout on each test
guards against a hang only.
"""

import random

import pytest
from fuzz_answers import GOLDS, fuzz_strings
from fuzz_answers import PIECES as LATEX_PIECES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from work_counter import PythonLines

from rl_reason.rewards import registry
from rl_reason.rewards.compose import compose
from rl_reason.rewards.equivalence import MAX_LATEX_CHECKS, canonical_answer, is_equivalent
from rl_reason.rewards.extraction import extract_answer
from rl_reason.rewards.latex import DEFAULT_TIMEOUT, LatexChecker

# The Python lines one answer's extraction and two comparisons may run: a constant plus
# a budget a character (measured on 3,000 fuzzed strings: at most 0.59 of this bound).
CALL_LINES = 30_000
CALL_LINES_PER_CHAR = 50


def _bounded_call(latex, fn, *args):
    """fn(*args) within its Python-line budget; returns its result and the LaTeX checks sent."""
    lines = PythonLines(CALL_LINES + CALL_LINES_PER_CHAR * sum(len(a) for a in args if a))
    before = latex.stats.checks + latex.stats.cached
    result = lines(fn, *args)
    return result, latex.stats.checks + latex.stats.cached - before


@pytest.fixture(scope="module")
def latex():
    with LatexChecker(timeout=DEFAULT_TIMEOUT) as checker:
        checker.start()
        yield checker


def _scorer(completions, batch, offsets):
    return [[0.5] * len(row) for row in offsets]


_PIECES = [
    "####", " ", "\n", "\\boxed{", "}", "{", "The answer is", "$", ",", ".", "-", "%",
    "<<", ">>", "=", "+", "*", "/", "//", "**", "^", "(", ")", "9" * 40, "0", "1,000",
    "\\frac{1}{2}", "9**9**9", "(" * 50, "e", "x", "\u200b", "\ud800",
]  # fmt: skip
ADVERSARIAL = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(_PIECES), max_size=150).map("".join),
    st.builds(
        lambda n, d: f"<<{'9' * n}**{'9' * d}=1>>", st.integers(1, 3000), st.integers(1, 3000)
    ),
    st.integers(1, 5000).map(lambda n: "<<" + "(" * n + "1" + ")" * n + "=1>>"),
    st.integers(1, 100_000).map(lambda n: "#### " + "9" * n),
    st.lists(st.sampled_from(LATEX_PIECES), max_size=60).map("".join),
    st.integers(2, 12).map(lambda h: "\\boxed{" + "^{".join(["9"] * h) + "}" * h),
    st.integers(5, 2000).map(lambda n: "The answer is $" + "{" * n + "1" + "}" * n + "$."),
)


def _all_rewards(latex):
    """Every registered reward, each with weight 1, the ORM ones on a stub scorer."""
    return compose(
        {name: {"weight": 1.0, "mode": "flexible"} if name == "correctness" else 1.0
         for name in registry.names()},
        latex=latex,
        scorer=_scorer,
    )  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ADVERSARIAL, min_size=1, max_size=4), ADVERSARIAL, ADVERSARIAL)
def test_composed_rewards_never_raise_and_stay_well_formed(latex, completions, reference, gold):
    n = len(completions)
    batch = {"question": ["q"] * n, "answer": [reference] * n, "final_answer": [gold] * n}
    out = _all_rewards(latex)(completions, batch)
    assert len(out.totals) == len(out.dense) == n
    for text, pairs in zip(completions, out.dense):
        assert all(0 <= offset <= len(text) for offset, _ in pairs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ADVERSARIAL, ADVERSARIAL, st.sampled_from(["strict", "flexible"]))
def test_extraction_and_equivalence_never_raise(latex, text, gold, mode):
    def extract_and_compare(text, gold):
        answer = extract_answer(text, mode)
        canonical_answer(answer)
        to_gold = is_equivalent(answer, gold, latex=latex)
        return to_gold, is_equivalent(text, text[::-1], latex=latex)

    results, checks = _bounded_call(latex, extract_and_compare, text, gold)
    assert all(r in (True, False) for r in results)
    assert checks <= 2 * MAX_LATEX_CHECKS  # two comparisons, each within its budget of checks


@pytest.mark.slow
def test_20000_fuzzed_strings_through_every_reward(latex):
    """Random Unicode, towers, brace nests, huge digit strings, 1e308 and random LaTeX."""
    strings = fuzz_strings(20_000, seed=14)
    rng = random.Random(14)
    golds = [rng.choice(GOLDS + strings[:100]) for _ in strings]  # hostile golds too
    answers = []
    for text in strings:
        for mode in ("strict", "flexible"):
            answer = extract_answer(text, mode)
            assert answer is None or isinstance(answer, str)
            key = canonical_answer(answer)
            assert key is None or isinstance(key, str)
        answers.append(answer)

    # Every registered reward on all 20,000 as completions: Correctness judges
    # them with judge_many, so every LaTeX check runs on the real workers.
    reward = _all_rewards(latex)
    references = strings[::-1]  # hostile reference solutions for the step rewards
    for start in range(0, len(strings), 2000):
        stop = start + 2000
        n = len(strings[start:stop])
        batch = {
            "question": ["q"] * n,
            "answer": references[start:stop],
            "final_answer": golds[start:stop],
        }
        out = reward(strings[start:stop], batch)
        assert len(out.totals) == n and all(isinstance(t, float) for t in out.totals)
    assert latex.stats.checks > 500  # the fuzz does reach the workers

    for answer, gold in zip(answers[:1000], golds):  # one call at a time, each counted
        equal, checks = _bounded_call(latex, is_equivalent, answer, gold)
        assert equal in (True, False) and checks <= MAX_LATEX_CHECKS


HOSTILE_NOTES = st.one_of(
    st.builds(lambda b, e: f"<<{b}**{e}=1>>", st.integers(2, 10**6), st.integers(10**3, 10**9)),
    st.integers(2, 30).map(lambda h: "<<" + "**".join(["99"] * h) + "=1>>"),
    st.integers(33, 10_000).map(lambda n: "<<" + "(" * n + "1" + ")" * n + "=1>>"),
    st.integers(41, 100_000).map(lambda n: f"<<{'7' * n}+1=8>>"),
)


@pytest.mark.timeout(120)  # a hang guard, not a speed assertion
@settings(max_examples=100, deadline=None)
@given(HOSTILE_NOTES)
def test_hostile_calculator_notes_are_rejected(note):
    reward = compose({"calculator": 1.0, "step_match": 1.0})
    budget = CALL_LINES + CALL_LINES_PER_CHAR * len(note)
    out = PythonLines(budget)(reward, [note], {"answer": ["<<1*1=1>>"]})
    assert out.components == {"calculator": [-1.0], "step_match": [0.0]}
