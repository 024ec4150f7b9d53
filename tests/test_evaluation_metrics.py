"""Metrics against hand-computed cases: ties, no-answer samples, K=1, the unbiased estimator."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_reason.evaluation import metrics
from rl_reason.evaluation.evaluate import evaluate


def test_majority_index_ties_go_to_the_first_seen_answer():
    assert metrics.majority_index(["5", "6", "6", "5"]) == 0  # 2-2 tie: "5" came first
    assert metrics.majority_index(["5", "6", "6"]) == 1
    assert metrics.majority_index([None, None, "3"]) == 2  # no answer never wins
    assert metrics.majority_index([None, None]) is None
    assert metrics.majority_index([]) is None


def test_maj_rerank_pass_by_hand():
    keys = ["5", "6", "6", None]
    correct = [False, True, True, False]
    assert metrics.maj_at_k(keys, correct)
    assert not metrics.maj_at_k(keys[:2], correct[:2])  # tie -> "5", wrong
    assert not metrics.maj_at_k([None], [False])
    assert metrics.rerank_at_k([0.1, 0.9, 0.9, 0.0], correct)
    assert not metrics.rerank_at_k([0.9, 0.1, 0.9, 0.0], correct)  # tie -> first
    assert not metrics.rerank_at_k([], [])
    assert metrics.pass_at_k(correct) and not metrics.pass_at_k([False, False])
    assert metrics.distinct(keys) == 2


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),
        (4, 2, 2, 5 / 6),
        (4, 3, 2, 1.0),
        (10, 0, 5, 0.0),
    ],
)
def test_unbiased_pass_at_k_by_hand(n, c, k, expected):
    assert metrics.pass_at_k_unbiased(n, c, k) == pytest.approx(expected)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n)))
)
def test_unbiased_pass_at_k_is_the_mean_over_all_k_subsets(args):
    n, c, k = args
    correct = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(correct, k))
    assert metrics.pass_at_k_unbiased(n, c, k) == pytest.approx(
        sum(map(any, subsets)) / len(subsets)
    )


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_unbiased_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        metrics.pass_at_k_unbiased(n, c, k)


SAMPLES = [
    ["#### 5", "#### 6", "#### 6", "no idea"],  # gold 6
    ["The answer is 3.", "nothing", "\\boxed{3}", "#### 4"],  # gold 3
    ["#### 1,000", "#### 1000.0", "#### 7", "#### 7"],  # gold 1000
]
GOLDS = ["6", "3", "1000"]
SCORES = [[0.9, 0.1, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.1, 0.0]]


def test_evaluate_by_hand():
    out = evaluate(
        SAMPLES, GOLDS, greedy=["#### 6", "#### 2", "#### 1000"], scores=SCORES, ks=[1, 2, 4]
    )
    expected = {
        "maj@1": 2 / 3,  # greedy: right, wrong, right
        "maj@2": (0 + 1 + 1) / 3,  # "5"/"6" tie -> 5; only "3" answers; 1000 twice
        "maj@4": (1 + 1 + 1) / 3,  # 1000 vs 7 is a 2-2 tie won by 1000 (first)
        "pass@1": (0 + 1 + 1) / 3,
        "pass@2": 1.0,
        "pass@4": 1.0,
        "pass@1_unbiased": (2 / 4 + 2 / 4 + 2 / 4) / 3,
        "pass@2_unbiased": (5 / 6) * 3 / 3,
        "pass@4_unbiased": 1.0,
        "rerank@1": (0 + 1 + 1) / 3,
        "rerank@2": (0 + 1 + 1) / 3,  # ties in score go to the first sample
        "rerank@4": (0 + 1 + 1) / 3,
        "sample_accuracy": 0.5,
        "no_answer": (1 + 1 + 0) / 12,
        "distinct_answers": (2 + 2 + 2) / 3,
        "distinct_solutions": (3 + 4 + 3) / 3,  # "#### 6" and "#### 7" repeat
    }
    assert out == pytest.approx(expected)


def test_evaluate_with_k_equal_one_and_no_greedy():
    out = evaluate([["#### 3"], ["#### 4"]], ["3", "5"], mode="strict")
    assert out["maj@1"] == out["pass@1"] == out["pass@1_unbiased"] == out["sample_accuracy"] == 0.5
    assert "rerank@1" not in out


def test_strict_mode_ignores_unmarked_numbers():
    assert evaluate([["so 3"]], ["3"], mode="strict")["pass@1"] == 0.0
    assert evaluate([["so 3"]], ["3"], mode="flexible")["pass@1"] == 1.0


@pytest.mark.parametrize(
    "samples, golds, ks",
    [
        ([["a"]], [], None),
        ([["a"], ["a", "b"]], ["1", "2"], None),
        ([[]], ["1"], None),
        ([["a"]], ["1"], [2]),
    ],
)
def test_evaluate_rejects_malformed_input(samples, golds, ks):
    with pytest.raises(ValueError):
        evaluate(samples, golds, ks=ks)


def test_default_ks_are_one_and_k():
    out = evaluate([["#### 1"] * 3], ["1"])
    assert {name for name in out if "@" in name} == {
        "maj@1",
        "maj@3",
        "pass@1",
        "pass@3",
        "pass@1_unbiased",
        "pass@3_unbiased",
    }
    assert math.isclose(out["distinct_solutions"], 1.0)
