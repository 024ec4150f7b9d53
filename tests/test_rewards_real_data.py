"""Rewards against every real GSM8K and SVAMP row (skipped without ../shared/data)."""

import re

import pytest

from rl_reason.data import sources
from rl_reason.rewards import calculator
from rl_reason.rewards.arithmetic import evaluate
from rl_reason.rewards.compose import compose
from rl_reason.rewards.equivalence import canonical_answer, is_equivalent
from rl_reason.rewards.extraction import extract_answer
from rl_reason.rewards.functions import reference_results
from rl_reason.rewards.numbers import format_number, parse_number

DATA_DIR = sources.locate_data_dir()
pytestmark = pytest.mark.skipif(
    DATA_DIR is None,
    reason=f"real data not found: set ${sources.DATA_DIR_ENV} or put it in ../shared/data",
)


@pytest.fixture(scope="module")
def gsm8k():
    return {split: sources.read_gsm8k(DATA_DIR, split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def svamp():
    return sources.read_svamp(DATA_DIR)


class _NoLatex:
    def equivalent(self, gold, predicted):
        raise AssertionError("no reference answer should need LaTeX")


REWARDS = {"correctness": 1.0, "format": 1.0, "step_match": 1.0, "calculator": 1.0}


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_references_earn_every_reward(gsm8k, split):
    rows = gsm8k[split]
    solutions = [row["answer"] for row in rows]
    batch = {column: [row[column] for row in rows] for column in rows[0]}
    out = compose(REWARDS, latex=_NoLatex())(solutions, batch)
    assert out.components["correctness"] == [1.0] * len(rows)
    assert out.components["format"] == [1.0] * len(rows)
    assert out.components["calculator"] == [0.0] * len(rows)  # every note checks out
    with_notes = [i for i, s in enumerate(solutions) if calculator.find_notes(s)]
    assert len(with_notes) > 0.98 * len(rows)
    for i, credit in enumerate(out.components["step_match"]):
        assert credit == pytest.approx(1.0 if i in set(with_notes) else 0.0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_extraction_matches_the_gold_column(gsm8k, split):
    for row in gsm8k[split]:
        answer = extract_answer(row["answer"], "strict")
        assert canonical_answer(answer) == row["final_answer"]
        assert extract_answer(re.sub("<<[^>]*>>", "", row["answer"]), "flexible") == answer


def _break_arithmetic(solution):
    """Every stated result off by one, in the note and in the text right after it."""

    def bump(match):
        wrong = format_number(parse_number(match.group(2)) + 1)
        return f"<<{match.group(1)}={wrong}>>" + (wrong if match.group(3) else "")

    return re.sub(r"<<([^=>]*)=([^>]*)>>(\2)?", bump, solution)


def test_gsm8k_wrong_arithmetic_earns_no_step_credit(gsm8k):
    rows = [row for row in gsm8k["test"] if calculator.find_notes(row["answer"])]
    broken = [_break_arithmetic(row["answer"]) for row in rows]
    assert all(b != row["answer"] for b, row in zip(broken, rows))
    reward = compose({"step_match": 1.0, "calculator": 1.0})
    out = reward(broken, {"answer": [row["answer"] for row in rows]})
    assert out.components["step_match"] == [0.0] * len(rows)
    assert all(penalty < 0 for penalty in out.components["calculator"])


def test_known_gsm8k_rows(gsm8k):
    assert (len(gsm8k["train"]), len(gsm8k["test"])) == (7473, 1319)
    assert gsm8k["train"][0]["question"].startswith("Natalia sold clips")
    assert gsm8k["train"][0]["final_answer"] == "72"
    assert gsm8k["test"][0]["final_answer"] == "18"
    assert gsm8k["test"][-1]["final_answer"] == "14"
    assert sum("," in row["answer"].split("####")[-1] for row in gsm8k["train"]) == 79
    assert reference_results(gsm8k["train"][0]["answer"]) == [24, 72]


def test_every_svamp_row_and_the_one_label_error(svamp):
    """The equation's value is the official label on 999 rows; chal-680 is the known exception."""
    assert len(svamp) == 1000
    disagreeing = {}
    for row in svamp:
        assert is_equivalent(extract_answer(row["answer"], "strict"), row["final_answer"])
        assert evaluate(row["equation"]) == evaluate(row["final_answer"])
        if row["final_answer"] != row["official_answer"]:
            disagreeing[row["id"]] = (row["official_answer"], row["final_answer"])
    assert disagreeing == {"chal-680": ("1", "5")}
    assert set(disagreeing) == set(sources.SVAMP_LABEL_ERRORS)


def test_svamp_solutions_earn_every_reward(svamp):
    solutions = [row["answer"] for row in svamp]
    batch = {column: [row[column] for row in svamp] for column in svamp[0]}
    out = compose(REWARDS, latex=_NoLatex())(solutions, batch)
    for name in ("correctness", "format"):
        assert out.components[name] == [1.0] * len(svamp)
    assert out.components["calculator"] == [0.0] * len(svamp)
    single_number = [row["id"] for row in svamp if not reference_results(row["answer"])]
    assert single_number == ["chal-555"]  # its equation is just "8.0": no step to credit
    assert sorted(set(out.components["step_match"])) == [0.0, 1.0]
