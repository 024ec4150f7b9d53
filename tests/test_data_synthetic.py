"""The synthetic task: seeded, disjoint splits, GSM8K-shaped solutions."""

import re

import numpy as np

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


def test_bare_answers_replace_a_stable_fraction_of_solutions_with_their_final_line():
    examples = synthetic.generate("train", 400)
    mixed = synthetic.with_bare_answers(examples, 0.5)
    bare = [m["answer"] == f"#### {e['final_answer']}" for e, m in zip(examples, mixed)]
    assert 0.4 < np.mean(bare) < 0.6
    for e, m, is_bare in zip(examples, mixed, bare):
        assert m["question"] == e["question"] and m["final_answer"] == e["final_answer"]
        assert is_bare or m == e
    # The style follows the question, not its position or the list it came in.
    again = synthetic.with_bare_answers(examples[::-1], 0.5)[::-1]
    assert again == mixed
    assert synthetic.with_bare_answers(examples, 0.0) == examples
    assert all(m["answer"].startswith("####") for m in synthetic.with_bare_answers(examples, 1.0))
    with pytest.raises(ValueError, match="fraction"):
        synthetic.with_bare_answers(examples, 1.5)


def test_a_task_with_bare_answers_changes_its_train_solutions_only():
    from rl_reason.experiments import tasks
    from rl_reason.experiments.config import base_config

    config = base_config()
    config.data.update(num_train=200, num_eval=50)
    plain = tasks.load(config)
    config.data.bare_answer_fraction = 0.5
    mixed = tasks.load(config)
    assert mixed.heldout == plain.heldout
    assert [e["question"] for e in mixed.train] == [e["question"] for e in plain.train]
    assert mixed.train == synthetic.with_bare_answers(plain.train, 0.5) != plain.train
    config.data.task = "synthetic_text"
    with pytest.raises(ValueError, match="bare_answer_fraction"):
        tasks.load(config)
