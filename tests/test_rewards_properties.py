"""No reward function raises or stalls on any string a model can write."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_reason.rewards.compose import compose
from rl_reason.rewards.equivalence import canonical_answer, is_equivalent
from rl_reason.rewards.extraction import extract_answer


class _RecordingLatex:
    """Stands in for the worker (tested on its own) and checks what reaches it."""

    def equivalent(self, gold, predicted):
        assert isinstance(gold, str) and isinstance(predicted, str)
        return False


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
)
REWARD = compose(
    {
        "correctness": {"weight": 1.0, "mode": "flexible"},
        "format": 0.5,
        "step_match": 1.0,
        "calculator": 1.0,
        "orm_outcome": 0.1,
        "orm_steps": 0.1,
    },
    latex=_RecordingLatex(),
    scorer=_scorer,
)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ADVERSARIAL, min_size=1, max_size=4), ADVERSARIAL, ADVERSARIAL)
def test_composed_rewards_never_raise_and_stay_well_formed(completions, reference, gold):
    n = len(completions)
    batch = {"question": ["q"] * n, "answer": [reference] * n, "final_answer": [gold] * n}
    out = REWARD(completions, batch)
    assert len(out.totals) == len(out.dense) == n
    for text, pairs in zip(completions, out.dense):
        assert all(0 <= offset <= len(text) for offset, _ in pairs)


@settings(max_examples=300, deadline=1000)
@given(ADVERSARIAL, ADVERSARIAL, st.sampled_from(["strict", "flexible"]))
def test_extraction_and_equivalence_never_raise(text, gold, mode):
    answer = extract_answer(text, mode)
    canonical_answer(answer)
    assert is_equivalent(answer, gold, latex=_RecordingLatex()) in (True, False)


HOSTILE_NOTES = st.one_of(
    st.builds(lambda b, e: f"<<{b}**{e}=1>>", st.integers(2, 10**6), st.integers(10**3, 10**9)),
    st.integers(2, 30).map(lambda h: "<<" + "**".join(["99"] * h) + "=1>>"),
    st.integers(33, 10_000).map(lambda n: "<<" + "(" * n + "1" + ")" * n + "=1>>"),
    st.integers(41, 100_000).map(lambda n: f"<<{'7' * n}+1=8>>"),
)


@settings(max_examples=100, deadline=1000)
@given(HOSTILE_NOTES)
def test_hostile_calculator_notes_are_rejected(note):
    out = compose({"calculator": 1.0, "step_match": 1.0})([note], {"answer": ["<<1*1=1>>"]})
    assert out.components == {"calculator": [-1.0], "step_match": [0.0]}
