"""Prompt templates: layout, exemplar choice, truncation at the next question."""

import pytest

from rl_reason.data import templates

EXAMPLES = [{"question": f"Q{i}?", "answer": f"step {i}\n#### {i}"} for i in range(10)]


def test_zero_shot_prompt_and_completion_concatenate_to_the_lm_eval_layout():
    text = templates.format_prompt("How many? ") + templates.format_completion("a\n#### 3\n")
    assert text == "Question: How many?\nAnswer: a\n#### 3"


def test_few_shot_prompt_puts_exemplars_first_separated_by_blank_lines():
    prompt = templates.format_prompt("Last?", EXAMPLES[:2])
    assert prompt == (
        "Question: Q0?\nAnswer: step 0\n#### 0\n\n"
        "Question: Q1?\nAnswer: step 1\n#### 1\n\n"
        "Question: Last?\nAnswer:"
    )


def test_select_exemplars_is_seeded_and_distinct():
    picked = templates.select_exemplars(EXAMPLES, 4, seed=7)
    assert picked == templates.select_exemplars(EXAMPLES, 4, seed=7)
    assert len({e["question"] for e in picked}) == 4
    assert templates.select_exemplars(EXAMPLES, 0) == []
    with pytest.raises(ValueError):
        templates.select_exemplars(EXAMPLES, 11)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 2+2=4\n#### 4\n\nQuestion: next one", " 2+2=4\n#### 4"),
        (" #### 4\nQuestion: x\n\nQuestion: y", " #### 4"),
        (" no stop here", " no stop here"),
    ],
)
def test_truncate_completion(text, expected):
    assert templates.truncate_completion(text) == expected
