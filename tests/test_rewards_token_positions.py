"""Character-offset rewards onto tokens, with a real fast tokenizer's offsets."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_reason.data import synthetic, tokenizer
from rl_reason.rewards.functions import StepMatch
from rl_reason.rewards.token_positions import char_to_token_positions, token_rewards, token_starts


@pytest.fixture(scope="module")
def tok():
    texts = [e["question"] + "\n" + e["answer"] for e in synthetic.generate("train", 300)]
    return tokenizer.train_tokenizer(texts, vocab_size=350)


def test_hand_case():
    starts = [0, 3, 7, 8]  # "Ann| has| |3"
    assert char_to_token_positions(starts, [0, 1, 3, 4, 7, 8, 9, 100]) == [0, 0, 0, 1, 1, 2, 3, 3]


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=200), st.data())
def test_the_chosen_token_is_the_one_completing_the_prefix(tok, text, data):
    [starts] = token_starts(tok, [text])
    offset = data.draw(st.integers(1, len(text)))
    [position] = char_to_token_positions(starts, [offset])
    assert starts[position] < offset  # the token has begun before the offset ...
    assert position + 1 == len(starts) or starts[position + 1] >= offset  # ... and is the last


def test_step_rewards_land_on_the_last_token_of_each_step(tok):
    example = synthetic.generate("test", 1, difficulty=synthetic.Difficulty(2, 2, 10))[0]
    text = example["answer"]
    dense = StepMatch()([text], {"answer": [text]})
    [starts] = token_starts(tok, [text])
    rewards = token_rewards(dense, [starts], length=len(starts))
    assert rewards.dtype == np.float32 and rewards.shape == (1, len(starts))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for position in np.flatnonzero(rewards[0]):
        assert tok.decode(ids[: position + 1]).endswith(".")  # each step ends with "."
    assert rewards.sum() == pytest.approx(1.0)


def test_rewards_past_the_length_are_paid_at_the_last_position():
    dense = [[(1, 1.0), (50, 2.0)], [], [(0, -1.0)]]
    starts = [list(range(60)), [0], [0, 1]]
    out = token_rewards(dense, starts, length=10)
    assert out[0, 0] == 1.0 and out[0, 9] == 2.0 and out[0].sum() == 3.0
    assert not out[1].any()
    assert out[2, 0] == -1.0
