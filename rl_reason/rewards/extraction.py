"""Finding the final answer in a model's (or a reference's) solution text.

Strict mode accepts only an explicit final-answer marker, in this order:
the first ``#### x`` line (GSM8K's convention; what follows it is
continuation, not answer), the last ``\\boxed{x}``, the last
"the answer is x". Flexible mode falls back to the last number in the text,
as lm-eval-harness's flexible-extract does. Every scan is linear in the
text length, so adversarial completions cannot make extraction slow.
"""

from __future__ import annotations

import re
from typing import Literal

Mode = Literal["strict", "flexible"]

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"answer is\b:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])[ \t]*")
_WORD = re.compile(r"[^\s$]+")
_BRACE = re.compile(r"[{}]")
_NUMBER = re.compile(r"(?:(?<![\w.)])-)?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])\.\d+")


def _after_hashes(text: str) -> str | None:
    match = _HASHES.search(text)
    if match is None:
        return None
    return match.group(1).strip() or None


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` that is closed -> index of its ``}``, in one pass."""
    stack, pairs = [], {}
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            pairs[stack.pop()] = match.start()
    return pairs


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces) or ``\\boxed x``."""
    matches = list(_BOXED.finditer(text))
    pairs = _brace_pairs(text) if matches else {}
    for match in reversed(matches):
        start = match.end()
        if text.startswith("{", start):
            content = text[start + 1 : pairs.get(start, start + 1)]
        else:
            word = _WORD.match(text, start)
            content = word.group() if word else ""
        if content.strip():
            return content.strip()
    return None


def _answer_is(text: str) -> str | None:
    """What follows the last "the answer is", up to the end of its sentence."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    line = text[matches[-1].end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    answer = line[: end.start()] if end else line
    stop = len(answer)
    while stop and (answer[stop - 1].isspace() or answer[stop - 1] == "."):
        stop -= 1  # trailing dots and spaces, in any order, in linear time
    return answer[:stop].strip() or None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (a leading ``-`` only when it is a sign)."""
    matches = _NUMBER.findall(text)
    return matches[-1].rstrip(",") if matches else None


def _unwrap_math(answer: str | None) -> str | None:
    """``$x=5$`` and ``\\(x=5\\)`` -> ``x=5``; a lone currency ``$18`` is left as it is."""
    if answer is None:
        return None
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        wrapped = answer.startswith(left) and answer.endswith(right)
        if wrapped and len(answer) > len(left) + len(right):
            inner = answer[len(left) : -len(right)].strip()
            if inner and "$" not in inner.replace("\\$", ""):
                return inner
    return answer


def extract_answer(text: str, mode: Mode = "strict") -> str | None:
    """The final answer written in ``text``, as text, or None if there is none.

    An answer wrapped whole in math delimiters is returned without them.
    """
    answer = _unwrap_math(_after_hashes(text) or _boxed(text) or _answer_is(text))
    if answer is None and mode == "flexible":
        answer = last_number(text)
    return answer
