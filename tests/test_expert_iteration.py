"""Expert Iteration's pure pieces: filter, dedup, accumulate, cut, digest, jsonl, SFT arrays."""

import json

import chex
import numpy as np
import pytest

from rl_reason.algorithms import expert_iteration as ei
from rl_reason.data import sft as sft_data
from rl_reason.data import sources, synthetic, templates
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.rewards.extraction import extract_answer

DATA_DIR = sources.locate_data_dir()


def _sol(qid, completion, round=0, reward=1.0):
    return ei.Solution(qid, f"Question: q{qid}\nAnswer:", completion, reward, round)


# ----------------------------------------------------------------------------- keys and filtering


def test_normalize_collapses_whitespace_only():
    a = " Ann has 3+2=<<3+2=5>>5 apples.\n#### 5\n"
    b = "Ann has  3+2=<<3+2=5>>5 apples. \n\n####\t5"
    assert ei.normalize_solution(a) == ei.normalize_solution(b) == (
        "Ann has 3+2=<<3+2=5>>5 apples. #### 5"
    )
    # Annotations, case and punctuation are part of the solution.
    assert ei.normalize_solution("Ann has 5 apples.\n#### 5") != ei.normalize_solution(a)
    lower = "ann has 3+2=<<3+2=5>>5 apples.\n#### 5"
    assert ei.normalize_solution(lower) != ei.normalize_solution(a)


def test_select_correct_keeps_rewards_at_or_above_threshold_in_order():
    kept = ei.select_correct(
        [0, 0, 1, 2],
        ["p0", "p0", "p1", "p2"],
        ["a\n#### 1", "b\n#### 2", "c\n#### 3", "d\n#### 4"],
        [1.0, 0.0, 0.5, 1.0],
        round=3,
        threshold=0.5,
    )
    assert [(s.question_id, s.completion, s.reward, s.round) for s in kept] == [
        (0, "a\n#### 1", 1.0, 3),
        (1, "c\n#### 3", 0.5, 3),
        (2, "d\n#### 4", 1.0, 3),
    ]
    assert ei.select_correct([0], ["p"], ["x"], [0.99], round=0, threshold=1.0) == []
    with pytest.raises(ValueError, match="rewards has 1 entries for 2"):
        ei.select_correct([0, 1], ["p", "p"], ["x", "y"], [1.0], round=0)


def test_select_correct_cuts_the_rambling_after_the_answer():
    text = " Ann has 2+3=<<2+3=5>>5 apples.\n#### 5\n\nQuestion: Ben has\n#### 7"
    (kept,) = ei.select_correct([0], ["p"], [text], [1.0], round=0)
    assert kept.completion == " Ann has 2+3=<<2+3=5>>5 apples.\n#### 5"
    (uncut,) = ei.select_correct([0], ["p"], [text], [1.0], round=0, cut=False)
    assert uncut.completion == text


# ----------------------------------------------------------------------------- cut_at_answer


@pytest.mark.parametrize(
    "text, want",
    [
        ("a\n#### 5\nrestated\n#### 5", "a\n#### 5"),
        ("a\n####   5   \nb", "a\n####   5   "),
        ("So the answer is 5. Then more text. The answer is 5.", "So the answer is 5."),
        # Extraction reads the LAST "answer is": the cut keeps it when earlier ones differ.
        (
            "The answer is 4. No wait, the answer is 5. Ok",
            "The answer is 4. No wait, the answer is 5.",
        ),
        ("The answer is 12\nand then", "The answer is 12"),
        ("no marker, just 42", "no marker, just 42"),
        ("\\boxed{7} and more", "\\boxed{7} and more"),
        ("####\nthe answer is 3. x", "####\nthe answer is 3."),  # an empty #### is no answer
    ],
)
def test_cut_at_answer(text, want):
    got = ei.cut_at_answer(text)
    assert got == want
    assert extract_answer(got) == extract_answer(text)


@pytest.mark.skipif(DATA_DIR is None, reason="real GSM8K not found (set $RL_REASON_DATA_DIR)")
def test_cut_at_answer_on_real_gsm8k_rows_followed_by_restated_junk():
    with open(DATA_DIR / "gsm8k_train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    for row in rows:
        solution = row["answer"]
        junk = (
            f"\n\nQuestion: {row['question']}\nAnswer: {solution}\n"
            + solution.split("\n")[0] * 3
        )
        sample = " " + solution + junk
        cut = ei.cut_at_answer(sample)
        assert cut == " " + solution
        assert extract_answer(cut) == sources.gsm8k_final_answer(solution)
    # As samples of a round: three distinct real solutions, kept and cut.
    kept = ei.select_correct(
        range(3), [templates.format_prompt(r["question"]) for r in rows],
        [" " + r["answer"] + "\n#### junk" for r in rows], [1.0] * 3, round=0,
    )
    assert [s.completion for s in kept] == [" " + r["answer"] for r in rows]


# ----------------------------------------------------------------------------- accumulation


def test_accumulate_dedups_per_question_across_three_rounds():
    round0 = [_sol(0, "x = 1\n#### 1"), _sol(0, "x  = 1\n#### 1 "), _sol(1, "y = 2\n#### 2")]
    d0, s0 = ei.accumulate((), round0)
    assert [s.completion for s in d0] == ["x = 1\n#### 1", "y = 2\n#### 2"]
    assert s0.as_dict() == dict(
        kept=3, duplicates=1, capped=0, new_unique=2, size=2, questions_covered=2
    )

    # The same text under another question is a different solution; a whitespace
    # variant of a round-0 solution is not new; a different solution is kept.
    round1 = [
        _sol(1, "x = 1\n#### 1", 1),
        _sol(0, "\tx = 1\n\n#### 1", 1),
        _sol(0, "x = 0 + 1\n#### 1", 1),
    ]
    d1, s1 = ei.accumulate(d0, round1)
    assert [(s.question_id, s.completion, s.round) for s in d1] == [
        (0, "x = 1\n#### 1", 0),
        (1, "y = 2\n#### 2", 0),
        (1, "x = 1\n#### 1", 1),
        (0, "x = 0 + 1\n#### 1", 1),
    ]
    assert (s1.kept, s1.duplicates, s1.new_unique, s1.size, s1.questions_covered) == (3, 1, 2, 4, 2)

    round2 = [_sol(2, "z = 3\n#### 3", 2), _sol(1, "y = 2\n#### 2", 2)]
    d2, s2 = ei.accumulate(d1, round2)
    assert d2[:4] == d1 and d2[4] == round2[0]
    assert (s2.new_unique, s2.duplicates, s2.questions_covered, s2.size) == (1, 1, 3, 5)
    # Replaying the rounds gives the same dataset: accumulation is deterministic.
    replay = ()
    for r in (round0, round1, round2):
        replay, _ = ei.accumulate(replay, r)
    assert replay == d2 and ei.dataset_digest(replay) == ei.dataset_digest(d2)


def test_accumulate_caps_solutions_per_question_keeping_the_earliest():
    first = [_sol(0, f"s{i}\n#### 1") for i in range(3)] + [_sol(1, "t\n#### 2")]
    d, s = ei.accumulate((), first, max_per_question=2)
    assert [s.completion for s in d] == ["s0\n#### 1", "s1\n#### 1", "t\n#### 2"]
    assert (s.capped, s.new_unique) == (1, 3)
    d, s = ei.accumulate(d, [_sol(0, "s9\n#### 1", 1), _sol(1, "u\n#### 2", 1)], max_per_question=2)
    assert [x.completion for x in d][-1] == "u\n#### 2" and (s.capped, s.new_unique) == (1, 1)
    with pytest.raises(ValueError):
        ei.accumulate((), first, max_per_question=0)


# ----------------------------------------------------------------------------- serialisation


def _dataset():
    d, _ = ei.accumulate(
        (),
        [
            _sol(0, " Ann has 2+3=<<2+3=5>>5 €.\n#### 5", 0, 1.0),
            _sol(7, "line\n#### -2.5", 1, 0.75),
            ei.Solution(3, 'Question: "quoted"\nAnswer:', "x\n#### 1", 1.0, 2),
        ],
    )
    return d


def test_solution_json_round_trip():
    for s in _dataset():
        assert ei.Solution.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(ValueError, match="fields"):
        ei.Solution.from_json({"question_id": 1})


def test_digest_is_stable_and_sensitive():
    d = _dataset()
    digest = ei.dataset_digest(d)
    assert digest == ei.dataset_digest(tuple(ei.Solution(**s.to_json()) for s in d))
    assert len(digest) == 64
    assert ei.dataset_digest(d[::-1]) != digest  # the order is the training order
    changed = (d[0].__class__(**{**d[0].to_json(), "reward": 0.5}),) + d[1:]
    assert ei.dataset_digest(changed) != digest
    assert ei.dataset_digest(()) == ei.dataset_digest([])


def test_jsonl_round_trip():
    d = _dataset()
    data = ei.to_jsonl(d)
    assert isinstance(data, bytes) and data.count(b"\n") == len(d) + 1
    assert ei.from_jsonl(data) == d
    assert ei.from_jsonl(data.decode("utf-8")) == d
    assert ei.from_jsonl(ei.to_jsonl(())) == ()
    assert ei.to_jsonl(ei.from_jsonl(data)) == data  # byte-stable


def test_jsonl_corruption_names_the_line():
    data = ei.to_jsonl(_dataset())
    lines = data.split(b"\n")
    # A changed character inside a record: its checksum no longer matches (line 3).
    bad = lines.copy()
    bad[2] = bad[2].replace(b"line", b"lime")
    with pytest.raises(ValueError, match="line 3: checksum mismatch"):
        ei.from_jsonl(b"\n".join(bad))
    # A torn write: the last record cut in half is not JSON (line 4).
    with pytest.raises(ValueError, match="line 4: not valid JSON"):
        ei.from_jsonl(data[:-20])
    # A lost line: every record is intact, the header's count says otherwise.
    with pytest.raises(ValueError, match="expected 3 solutions, found 2"):
        ei.from_jsonl(b"\n".join(lines[:2] + lines[3:]))
    # Swapped lines: the digest catches the new order.
    with pytest.raises(ValueError, match="line 1: digest"):
        ei.from_jsonl(b"\n".join([lines[0], lines[2], lines[1], *lines[3:]]))
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        ei.from_jsonl(lines[0] + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="line 1"):
        ei.from_jsonl(b"")


# ----------------------------------------------------------------------------- SFT arrays


def test_sft_arrays_encode_solutions_exactly_as_sft_encodes_references():
    examples = synthetic.generate("train", 4)
    tokenizer = tokenizer_lib.train_tokenizer(
        [ex["question"] + "\n" + ex["answer"] for ex in synthetic.generate("train", 100)], 300
    )
    prompts = [templates.format_prompt(ex["question"]) for ex in examples]
    # Sampled completions start with the space after "Answer:" and may end with a newline.
    samples = [" " + ex["answer"] + "\n" for ex in examples]
    dataset, _ = ei.accumulate(
        (), ei.select_correct(range(4), prompts, samples, [1.0] * 4, round=0)
    )
    arrays, truncated = ei.sft_arrays(tokenizer, dataset, 192)
    want, want_truncated = sft_data.pack_pairs(
        [
            sft_data.encode_pair(tokenizer, p, templates.format_completion(ex["answer"]))
            for p, ex in zip(prompts, examples)
        ],
        192,
        tokenizer.pad_token_id,
    )
    chex.assert_shape(arrays["tokens"], (4, 192))
    chex.assert_trees_all_equal(arrays, want)
    assert truncated == want_truncated == 0
    # The loss covers the completion and its EOS, not the prompt.
    row = arrays["tokens"][0][arrays["loss_mask"][0]]
    assert row[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row[:-1]) == templates.format_completion(examples[0]["answer"])
    _, cut = ei.sft_arrays(tokenizer, dataset, 8)
    assert cut == 4
    assert np.all(arrays["loss_mask"] <= arrays["input_mask"])
