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
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from rl_reason.data import sft as sft_data
from rl_reason.data import templates
from rl_reason.rewards import extraction

FORMAT = "rl_reason.expert_iteration.dataset"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Solution:
    """One kept sample: the question it answers, the exact prompt and the completion.

    ``prompt`` is the text the sampler was given (few-shot exemplars included),
    ``completion`` the decoded text after it, ``reward`` what it earned and
    ``round`` the EI round that sampled it (for per-round analysis).
    """

    FORMAT: ClassVar[str] = FORMAT  # the header of a file of these (see to_jsonl)

    question_id: int
    prompt: str
    completion: str
    reward: float
    round: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (plain str/int/float values)."""
        return {
            "question_id": int(self.question_id),
            "prompt": self.prompt,
            "completion": self.completion,
            "reward": float(self.reward),
            "round": int(self.round),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "Solution":
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(record) != fields:
            raise ValueError(f"a Solution has fields {sorted(fields)}, got {sorted(record)}")
        return cls(
            question_id=int(record["question_id"]),
            prompt=str(record["prompt"]),
            completion=str(record["completion"]),
            reward=float(record["reward"]),
            round=int(record["round"]),
        )


Dataset = tuple[Solution, ...]


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


def _canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_digest(dataset: Iterable[Solution]) -> str:
    """sha256 (hex) of the dataset's canonical JSON: equal datasets, equal digests.

    Order matters (it is the training order), so the digest of a resumed
    run's dataset proves it is the one the interrupted run had.
    """
    return _sha256(_canonical_json([s.to_json() for s in dataset]))


def to_jsonl(dataset: Sequence[Solution], record_type: type = Solution) -> bytes:
    """The dataset as UTF-8 JSON lines: a header, then one checksummed record per line.

    Header: ``{"format", "version", "count", "digest"}``; record lines:
    ``{"solution": {...}, "sha256": <of the solution's canonical JSON>}``. The
    per-line checksum names the damaged line; the header's count and digest
    catch lost or reordered lines. ``record_type`` is the records' class (any
    with ``to_json``/``from_json`` and a ``FORMAT`` naming its files, e.g.
    RCRL's labelled samples); the header carries its ``FORMAT``.
    """
    header = {
        "format": record_type.FORMAT,
        "version": FORMAT_VERSION,
        "count": len(dataset),
        "digest": dataset_digest(dataset),
    }
    lines = [_canonical_json(header)]
    for s in dataset:
        record = s.to_json()
        checksum = _sha256(_canonical_json(record))
        lines.append(_canonical_json({"solution": record, "sha256": checksum}))
    return ("\n".join(lines) + "\n").encode("utf-8")


def from_jsonl(data: bytes | str, record_type: type = Solution) -> Dataset:
    """Reads :func:`to_jsonl` output of ``record_type`` back; raises ValueError naming the
    first bad line (1-based)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise ValueError(f"EI dataset line {line}: not valid UTF-8") from error
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError("EI dataset line 1: missing header (empty file)")

    def parse(number: int, text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"EI dataset line {number}: not valid JSON ({error.msg})") from None

    header = parse(1, lines[0])
    if not isinstance(header, dict) or header.get("format") != record_type.FORMAT:
        raise ValueError(f"EI dataset line 1: not an {record_type.FORMAT} header")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"EI dataset line 1: version {header.get('version')} is not {FORMAT_VERSION}"
        )
    solutions = []
    for number, text in enumerate(lines[1:], start=2):
        entry = parse(number, text)
        if not isinstance(entry, dict) or set(entry) != {"solution", "sha256"}:
            raise ValueError(f"EI dataset line {number}: not a checksummed solution record")
        if _sha256(_canonical_json(entry["solution"])) != entry["sha256"]:
            raise ValueError(f"EI dataset line {number}: checksum mismatch (the line is corrupted)")
        try:
            solutions.append(record_type.from_json(entry["solution"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"EI dataset line {number}: {error}") from None
    if len(solutions) != header.get("count"):
        raise ValueError(
            f"EI dataset line {len(lines) + 1}: expected {header.get('count')} solutions, "
            f"found {len(solutions)} (lines lost or added)"
        )
    dataset = tuple(solutions)
    if dataset_digest(dataset) != header.get("digest"):
        raise ValueError("EI dataset line 1: digest does not match the records (lines reordered)")
    return dataset


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
