"""Scored samples as records, and the checksummed JSON-lines files that hold them.

EI's kept solutions, the ORM's labelled samples and RCRL's labelled ones are
records (`Solution`, or any class with `to_json`/`from_json` and a `FORMAT`);
a file of them has a header (format, version, count, digest) and one
checksummed record per line, so a damaged line is named and lost or
reordered lines are caught. The digest of a dataset goes into the run's
checkpoint: a resumed run proves it reads the dataset it wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

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
    def from_json(cls, record: Mapping[str, Any]) -> Solution:
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
