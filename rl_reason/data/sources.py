"""Reading the real GSM8K and SVAMP files from a local directory.

Every data set becomes rows with the same three text columns --
``question``, ``answer`` (a reference solution in GSM8K's format: steps with
``<<expr=value>>`` notes, then ``#### n``) and ``final_answer`` (the number,
no commas) -- so rewards, templates and metrics never special-case a data
set. SVAMP ships an equation instead of a solution; its solution is written
from the equation, one note per operation.

SVAMP's official label for ``chal-680`` is wrong (the equation and the story
give 5, the label says 1). ``final_answer`` carries the corrected value and
``official_answer`` the published label, so scoring against either is one
column away; the table below is the whole list and a test checks it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from fractions import Fraction

from rl_reason.rewards import arithmetic
from rl_reason.rewards.numbers import format_number

GSM8K_FILES = {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"}
SVAMP_FILE = "svamp.json"
SOURCES = {
    "gsm8k_train.jsonl": "https://github.com/openai/grade-school-math"
    " (grade_school_math/data/train.jsonl), MIT",
    "gsm8k_test.jsonl": "https://github.com/openai/grade-school-math"
    " (grade_school_math/data/test.jsonl), MIT",
    "svamp.json": "https://github.com/arkilpatel/SVAMP (SVAMP.json), MIT",
}
# The sha256 of each upstream file (GSM8K at grade-school-math commit 3101c7d5, SVAMP's
# SVAMP.json): a copy that differs is refused, since every reported number depends on it.
SHA256 = {
    "gsm8k_train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "gsm8k_test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "svamp.json": "5be77703a6d891ae476d7c082787ad361392aa02453b132516cdd5f4e7934e3e",
}
SVAMP_LABEL_ERRORS = {"chal-680": "5"}  # id -> the answer its equation and question give
DATA_DIR_ENV = "RL_REASON_DATA_DIR"


class MissingDataError(FileNotFoundError):
    """The manual data directory lacks a file; the message says where to get it."""


class DataDigestError(ValueError):
    """A data file is not the byte-for-byte upstream copy its pinned sha256 names."""


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # the cache key: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_digest(path: str | os.PathLike, name: str | None = None) -> None:
    """Raises DataDigestError unless `path` has the pinned sha256 of upstream `name`."""
    path = pathlib.Path(path)
    name = name or path.name
    expected = SHA256.get(name)
    if expected is None:
        return
    stat = path.stat()
    actual = _sha256(str(path), stat.st_size, stat.st_mtime_ns)
    if actual != expected:
        raise DataDigestError(
            f"{path} is not the upstream {name} (sha256 {actual}, expected {expected}):"
            f" a damaged, truncated or edited copy. Get it again from {SOURCES[name]}."
        )


def locate_data_dir() -> pathlib.Path | None:
    """``$RL_REASON_DATA_DIR``, else ``../shared/data`` beside the repository, if it exists."""
    candidates = [
        os.environ.get(DATA_DIR_ENV),
        pathlib.Path(__file__).parents[3] / "shared" / "data",
    ]
    return next((pathlib.Path(c) for c in candidates if c and pathlib.Path(c).is_dir()), None)


MANUAL_INSTRUCTIONS = (
    "Put the upstream files in the manual data directory under these names"
    " (byte-for-byte copies):\n"
    + "\n".join(f"  {file}: {source}" for file, source in SOURCES.items())
    + f"\nand pass that directory as manual_dir (or set ${DATA_DIR_ENV})."
)


def require_file(directory: str | os.PathLike | None, name: str) -> pathlib.Path:
    """``directory/name``, or a :class:`MissingDataError` saying where the file comes from;
    a file whose sha256 is not the pinned upstream one is a :class:`DataDigestError`."""
    path = pathlib.Path(directory or "") / name
    if directory is None or not path.is_file():
        raise MissingDataError(f"{name} not found in {directory!r}. {MANUAL_INSTRUCTIONS}")
    check_digest(path, name)
    return path


def gsm8k_final_answer(solution: str) -> str:
    """The gold number of a GSM8K solution: the text after ``####``, commas removed."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def read_gsm8k(directory: str | os.PathLike | None, split: str) -> list[dict[str, str]]:
    """The rows of GSM8K ``split`` ("train" or "test") in file order."""
    path = require_file(directory, GSM8K_FILES[split])
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows.append({**row, "final_answer": gsm8k_final_answer(row["answer"])})
    return rows


def _operand(value: Fraction) -> str:
    text = format_number(value)
    return f"({text})" if value < 0 or "/" in text else text


def equation_solution(equation: str) -> tuple[str, Fraction]:
    """A GSM8K-style solution for an infix equation, one note per operation, and its value."""
    lines = []

    def write(node: arithmetic.Node) -> tuple[Fraction, str]:
        if isinstance(node, arithmetic.BinaryOp):
            _, left_text = write(node.left)
            _, right_text = write(node.right)
            value = arithmetic.evaluate_tree(node)
            expr, result = f"{left_text}{node.op}{right_text}", format_number(value)
            lines.append(f"{expr} = <<{expr}={result}>>{result}")
            return value, _operand(value)
        value = arithmetic.evaluate_tree(node)
        return value, _operand(value)

    value, _ = write(arithmetic.parse(equation))
    lines.append(f"#### {format_number(value)}")
    return "\n".join(lines), value


def read_svamp(directory: str | os.PathLike | None) -> list[dict[str, str]]:
    """The 1000 SVAMP problems in file order, with a written solution and corrected labels."""
    with require_file(directory, SVAMP_FILE).open(encoding="utf-8") as f:
        raw = json.load(f)
    rows = []
    for item in raw:
        solution, _ = equation_solution(item["Equation"])
        official = format_number(Fraction(str(item["Answer"])))
        rows.append(
            {
                "id": item["ID"],
                "question": f"{item['Body'].strip()} {item['Question'].strip()}",
                "answer": solution,
                "final_answer": SVAMP_LABEL_ERRORS.get(item["ID"], official),
                "official_answer": official,
                "equation": item["Equation"],
                "type": item["Type"],
            }
        )
    return rows
