"""Reward functions, the registry and weighted composition, on hand-made cases."""

import ml_collections
import pytest

from rl_reason.rewards import registry
from rl_reason.rewards.compose import compose
from rl_reason.rewards.functions import CalculatorConsistency, Correctness, Format, StepMatch
from rl_reason.rewards.orm import OrmOutcome, OrmSteps

REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n"
    "#### 72"
)


def _batch(n, answer=REFERENCE, final="72"):
    return {"question": ["q"] * n, "answer": [answer] * n, "final_answer": [final] * n}


def test_correctness_values_and_modes():
    texts = ["#### 72", "#### 71", "The answer is 72.", "blah 72", "no answer", "#### 72.0 clips"]
    assert Correctness()(texts, _batch(6)) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert Correctness(mode="flexible")(texts, _batch(6)) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert Correctness(correct=2.0, incorrect=-1.0)(texts[:2], _batch(2)) == [2.0, -1.0]


def test_correctness_reads_the_gold_column_of_each_row():
    batch = {"final_answer": ["1", "2"]}
    assert Correctness()(["#### 1", "#### 1"], batch) == [1.0, 0.0]
    with pytest.raises(KeyError, match="final_answer"):
        Correctness()(["#### 1"], {"answer": ["x"]})
    with pytest.raises(ValueError, match="rows"):
        Correctness()(["#### 1"], batch)


def test_format():
    texts = ["#### 72", "#### seventy-two", "\\boxed{3}", "72", ""]
    assert Format()(texts, {}) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert Format(mode="flexible")(texts, {}) == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_step_match_credits_each_reference_result_once_at_step_ends():
    reward = StepMatch()
    [full] = reward([REFERENCE], _batch(1))
    first_end = REFERENCE.index("\n")
    second_end = REFERENCE.index("\n", first_end + 1)
    assert full == [(first_end, 0.5), (second_end, 0.5)]

    repeated = "a <<48/2=24>>24\nb <<48/2=24>>24\nc <<50+22=72>>72"
    assert [r for _, r in reward([repeated], _batch(1))[0]] == [0.5, 0.5]  # 24 paid once

    wrong = "a <<48/2=25>>25\nb <<48+25=72>>72"  # the 72 is stated but its arithmetic is wrong
    assert reward([wrong], _batch(1)) == [[]]
    assert StepMatch(scale=2.0)(["<<6*4=24>>"], _batch(1)) == [[(10, 1.0)]]
    assert reward(["<<1+1=2>>"], _batch(1, answer="#### 2")) == [[]]  # nothing to match


def test_calculator_consistency():
    text = "a <<2+2=4>>4 b <<2+2=5>>5 c <<10/3=3.33>> d <<10/3=3.3>> e <<9**9**9=1>> f <<oops>>"
    [pairs] = CalculatorConsistency()([text], {})
    assert [r for _, r in pairs] == [0.0, -1.0, 0.0, 0.0, -1.0, -1.0]
    assert pairs[0][0] == text.index(">>") + 2
    [pairs] = CalculatorConsistency(consistent=0.1, inconsistent=0.0)(["<<3*4=12>> <<3*4=13>>"], {})
    assert [r for _, r in pairs] == [0.1, 0.0]


class FakeOrm:
    """Scores the text up to each offset by how many digits it contains; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, completions, batch, offsets):
        self.calls.append(offsets)
        return [
            [sum(c.isdigit() for c in text[:o]) for o in row]
            for text, row in zip(completions, offsets)
        ]


def test_orm_rewards_ask_the_scorer_at_the_right_offsets():
    scorer = FakeOrm()
    texts = ["a1\n\nb22\n#### 3", ""]
    assert OrmOutcome(scorer, scale=0.5)(texts, {}) == [2.0, 0.0]
    assert scorer.calls[-1] == [[len(texts[0])], [0]]
    assert OrmSteps(scorer)(texts, {}) == [[(2, 1.0), (7, 3.0), (14, 4.0)], []]


def test_registry_names_and_errors():
    assert {"correctness", "format", "step_match", "calculator", "orm_outcome", "orm_steps"} <= set(
        registry.names()
    )
    with pytest.raises(KeyError, match="no reward named"):
        registry.factory("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("correctness", Correctness)


def test_compose_weights_sparse_and_dense_and_passes_runtime_objects():
    scorer = FakeOrm()
    reward = compose(
        {
            "correctness": 1.0,
            "step_match": {"weight": 0.5, "scale": 2.0},
            "calculator": {"weight": 0.25},
            "orm_outcome": {"weight": 0.1},
        },
        scorer=scorer,
    )
    texts = [REFERENCE, "x <<1+1=3>>3\n#### 71"]
    out = reward(texts, _batch(2))
    assert out.components == {
        "correctness": [1.0, 0.0],
        "step_match": [2.0, 0.0],
        "calculator": [0.0, -1.0],
        "orm_outcome": [sum(c.isdigit() for c in REFERENCE), 6],
    }
    assert out.totals == pytest.approx(
        [1.0 + 1.0 + 0.1 * out.components["orm_outcome"][0], -0.25 + 0.6]
    )
    for text, pairs, total in zip(texts, out.dense, out.totals):
        assert [o for o, _ in pairs] == sorted(o for o, _ in pairs)
        assert all(0 <= o <= len(text) for o, _ in pairs)
        assert sum(r for _, r in pairs) == pytest.approx(total)
    assert (len(texts[0]), 1.0) in out.dense[0]  # sparse rewards are paid at the end


def test_registered_custom_reward_composes(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))  # undone after the test

    class Length:
        dense = False

        def __init__(self, per_char=1.0):
            self.per_char = per_char

        def __call__(self, completions, batch):
            return [self.per_char * len(t) for t in completions]

    registry.register("test_length", Length)
    assert compose({"test_length": {"weight": 2.0, "per_char": 0.5}})(["abcd"], {}).totals == [4.0]


def test_compose_reads_ml_collections_configs():
    config = ml_collections.ConfigDict(
        {"rewards": {"correctness": 2.0, "format": {"weight": 0.5, "formatted": 3.0}}}
    )
    for spec in (config.rewards, ml_collections.FrozenConfigDict(config).rewards):
        assert compose(spec)(["#### 72"], _batch(1)).totals == [2.0 + 1.5]


def test_correctness_in_processes_agrees_with_one_process():
    from rl_reason.rewards.equivalence import PARALLEL_MIN_PAIRS

    n = PARALLEL_MIN_PAIRS + 500
    texts = [f"so #### {i % 97}" if i % 3 else f"The answer is ${i % 89}$." for i in range(n)]
    texts[7] = "\\boxed{\\sqrt{4}}"  # one LaTeX check among them
    batch = {"final_answer": [str(i % 97) if i != 7 else "2" for i in range(n)]}
    one = Correctness()(texts, batch)
    two = Correctness(processes=2)(texts, batch)
    assert one == two and one[7] == 1.0 and 0 < sum(one) < n


def test_process_map_runs_only_rl_reason_functions_and_survives_a_dead_process():
    from rl_reason.rewards.extraction import extract_answer
    from rl_reason.rewards.functions import extract_answers
    from rl_reason.rewards.parallel import ProcessMap

    pool = ProcessMap(2)
    try:
        with pytest.raises(ValueError, match="rl_reason"):
            pool.map(len, [("abc",)])
        chunks = [(["#### 1", "#### 2"], "strict"), (["\\boxed{3}"], "strict")]
        assert pool.map(extract_answers, chunks) == [["1", "2"], ["3"]]
        pool._procs[0].kill()  # its chunk runs in this process instead
        pool._procs[0].wait()
        assert pool.map(extract_answers, chunks) == [["1", "2"], ["3"]]
        assert extract_answer("#### 1") == "1"
    finally:
        pool.close()
