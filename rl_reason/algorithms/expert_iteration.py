"""Expert Iteration's pure pieces: keep the correct samples, deduplicate, accumulate.

One EI round (Havrilla et al., 2024, following Anthony et al., 2017): sample K
solutions per training question, keep the correct ones R_i, grow the dataset
D_i = D_{i-1} ∪ R_i (duplicates per question removed) and fine-tune on D_i with
the ordinary SFT step (``sft.sft_step``), so EI trains exactly like SFT.

Everything here is plain Python and numpy on decoded text: the outer loop
(``experiments/``) samples, scores, writes the dataset file atomically and
checkpoints; these functions only decide what the dataset is, so a resumed
run that replays them from the same inputs rebuilds the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rl_reason.data import sft as sft_data
from rl_reason.data import templates
from rl_reason.data.records import (  # noqa: F401 (the record format, re-exported)
    FORMAT,
    FORMAT_VERSION,
    Dataset,
    Solution,
    dataset_digest,
    from_jsonl,
    to_jsonl,
)
from rl_reason.rewards import extraction


def normalize_solution(text: str) -> str:
    """The dedup key of a completion: every whitespace run becomes one space, ends stripped.

    Nothing else changes: calculator annotations (``<<48/2=24>>``), numbers,
    punctuation and case are kept, so two solutions count as the same only
    when they differ in layout alone (the rule evaluation's
    ``distinct_solutions`` uses too).
    """
    return " ".join(text.split())


def cut_at_answer(text: str) -> str:
    """``text`` cut right after the line or sentence that states its final answer.

    Base models restate the solution or start new questions until the token
    budget ends; training on that junk teaches the model to ramble. The cut
    keeps what ``extraction.extract_answer(text, "strict")`` reads:

    - the first ``#### n`` line (strict extraction reads the first one): cut
      at the end of that line;
    - otherwise "the answer is n." sentences (extraction reads the last one):
      cut after the first such sentence stating the same answer as the last;
    - otherwise (a ``\\boxed`` answer, or no final answer) the text is
      returned unchanged.

    The cut never changes the strict answer: if it would, the text is
    returned whole.
    """
    answer = extraction.extract_answer(text, "strict")
    if answer is None:
        return text
    cut = _hashes_line_end(text)
    if cut is None:
        cut = _first_answer_is_end(text, answer)
    if cut is None:
        return text
    kept = text[:cut]
    return kept if extraction.extract_answer(kept, "strict") == answer else text


def _hashes_line_end(text: str) -> int | None:
    """End of the line holding the first ``####`` that has an answer after it."""
    match = extraction._HASHES.search(text)
    if match is None or not match.group(1).strip():
        return None
    return match.end()


def _first_answer_is_end(text: str, answer: str) -> int | None:
    """End of the first "answer is ..." sentence whose answer equals ``answer``."""
    for match in extraction._ANSWER_IS.finditer(text):
        line_end = text.find("\n", match.end())
        line_end = len(text) if line_end < 0 else line_end
        sentence = extraction._SENTENCE_END.search(text, match.end(), line_end)
        end = sentence.start() + 1 if sentence else line_end
        if extraction.extract_answer(text[:end], "strict") == answer:
            return end
    return None


def select_correct(
    question_ids: Sequence[int],
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float],
    *,
    round: int,
    threshold: float = 1.0,
    cut: bool = True,
) -> list[Solution]:
    """R_i: the samples whose reward is at least ``threshold``, in sample order.

    With ``cut`` each kept completion is :func:`cut_at_answer`-ed, so the
    model is fine-tuned to stop after its answer. The reward was computed on
    the uncut text; the cut keeps the answer it judged.
    """
    n = len(completions)
    columns = {"question_ids": question_ids, "prompts": prompts, "rewards": rewards}
    for name, column in columns.items():
        if len(column) != n:
            raise ValueError(f"{name} has {len(column)} entries for {n} completions")
    kept = []
    for qid, prompt, completion, reward in zip(question_ids, prompts, completions, rewards):
        if float(reward) >= threshold:
            text = cut_at_answer(completion) if cut else completion
            kept.append(Solution(int(qid), prompt, text, float(reward), int(round)))
    return kept


@dataclasses.dataclass(frozen=True)
class RoundSummary:
    """What one accumulation did, for the run's log."""

    kept: int  # samples offered (|R_i|)
    duplicates: int  # of those, already in the dataset or earlier in R_i
    capped: int  # new and unique, but over max_per_question
    new_unique: int  # added to the dataset
    size: int  # |D_i|
    questions_covered: int  # questions with at least one solution in D_i

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def accumulate(
    dataset: Iterable[Solution],
    new: Iterable[Solution],
    *,
    max_per_question: int | None = None,
) -> tuple[Dataset, RoundSummary]:
    """D_i = D_{i-1} ∪ R_i, without duplicates per question, and what changed.

    Two solutions are duplicates when they answer the same question and have
    the same :func:`normalize_solution` key; the earlier one stays. The order
    is deterministic: D_{i-1} as it was, then R_i's new solutions in sample
    order. ``max_per_question`` (the rejection-sampling cap of verl/OpenRLHF)
    keeps at most that many solutions per question, the earliest ones, so
    later rounds fill only the questions that still have room.
    """
    if max_per_question is not None and max_per_question < 1:
        raise ValueError(f"max_per_question must be None or >= 1, got {max_per_question}")
    out = list(dataset)
    seen = {(s.question_id, normalize_solution(s.completion)) for s in out}
    per_question: dict[int, int] = {}
    for s in out:
        per_question[s.question_id] = per_question.get(s.question_id, 0) + 1
    kept = duplicates = capped = 0
    for s in new:
        kept += 1
        key = (s.question_id, normalize_solution(s.completion))
        if key in seen:
            duplicates += 1
            continue
        if max_per_question is not None and per_question.get(s.question_id, 0) >= max_per_question:
            capped += 1
            continue
        seen.add(key)
        per_question[s.question_id] = per_question.get(s.question_id, 0) + 1
        out.append(s)
    summary = RoundSummary(
        kept=kept,
        duplicates=duplicates,
        capped=capped,
        new_unique=kept - duplicates - capped,
        size=len(out),
        questions_covered=len(per_question),
    )
    return tuple(out), summary


def sft_arrays(
    tokenizer: Any, dataset: Sequence[Solution], max_length: int
) -> tuple[dict[str, np.ndarray], int]:
    """{tokens, input_mask, loss_mask} [len(dataset), max_length] and the count cut at max_length.

    Each solution is encoded exactly as SFT encodes a reference solution:
    ``encode_pair(prompt, templates.format_completion(completion))`` -- one
    space after the prompt's "Answer:", the solution stripped, EOS after it,
    loss on the completion only -- so an EI round is SFT on D_i.
    """
    pairs = [
        sft_data.encode_pair(tokenizer, s.prompt, templates.format_completion(s.completion))
        for s in dataset
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return sft_data.pack_pairs(pairs, max_length, pad_id)
