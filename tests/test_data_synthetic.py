"""The synthetic task: seeded, disjoint splits, GSM8K-shaped solutions."""

import re

import pytest

from rl_reason.data import synthetic


def test_same_seed_same_examples_and_prefix_stable():
    a = synthetic.generate("train", 200, seed=3)
    assert a == synthetic.generate("train", 200, seed=3)
    assert synthetic.generate("train", 50, seed=3) == a[:50]
    assert a != synthetic.generate("train", 200, seed=4)


@pytest.mark.parametrize("difficulty", [synthetic.Difficulty(), synthetic.Difficulty(3, 5, 50)])
def test_train_and_test_are_disjoint_and_distinct(difficulty):
    train = {e["question"] for e in synthetic.generate("train", 3000, difficulty=difficulty)}
    test = {
        e["question"]
        for seed in (0, 1)
        for e in synthetic.generate("test", 500, seed=seed, difficulty=difficulty)
    }
    assert len(train) == 3000
    assert not train & test
    assert all(synthetic.split_of(q) == "test" for q in test)


def _evaluate_note(expr):
    a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
    a, b = int(a), int(b)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


@pytest.mark.parametrize("difficulty", [synthetic.Difficulty(), synthetic.Difficulty(2, 4, 30)])
def test_solutions_are_gsm8k_shaped_and_correct(difficulty):
    for ex in synthetic.generate("train", 300, seed=1, difficulty=difficulty):
        lines = ex["answer"].split("\n")
        assert lines[-1] == f"#### {ex['final_answer']}"
        steps = lines[:-1]
        assert difficulty.min_steps <= len(steps) <= difficulty.max_steps
        previous = None
        for line in steps:
            expr, value = re.search(r"<<([^=]+)=(\d+)>>", line).groups()
            first = int(re.match(r"\d+", expr).group())
            assert _evaluate_note(expr) == int(value) >= 0
            assert max(int(n) for n in re.findall(r"\d+", expr)[1:]) <= difficulty.max_operand
            assert previous is None or first == previous  # each step continues the last
            previous = int(value)
        assert str(previous) == ex["final_answer"]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        synthetic.generate("validation", 1)
    with pytest.raises(ValueError):
        synthetic.Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="distinct"):
        synthetic.generate("test", 10**6, difficulty=synthetic.Difficulty(1, 1, 2))
