"""One normal form for final answers, applied to both sides before any comparison.

What a human grader ignores is removed: math delimiters (``$...$``,
``\\(...\\)``, ``\\[...\\]``), a whole-answer ``\\boxed{}``, ``\\left`` /
``\\right`` and the ``\\big`` family, thin spaces (``\\!``, ``\\,``, ``\\;``,
``~``), every other space (a space that separates a command from a letter,
as in ``\\pi r``, is kept as one), ``\\dfrac`` / ``\\tfrac`` (-> ``\\frac``),
``\\frac12`` / ``\\sqrt2`` (-> braced), trailing periods, degree marks
(``^\\circ``, ``°``), percent signs (``\\%``, ``%``, as GSM8K and math-verify do),
currency dollars, ``{,}`` and thousands commas of a lone number, and a
leading ``x \\in``. What changes the value is kept: ``\\mbox`` /
``\\textbf`` / ``\\mathrm`` become ``\\text`` with their words (units such as
``\\text{inches}^3`` stay), and base subscripts (``_{6}``, ``_6``) stay.

Everything here is linear-time string work on inputs capped at
:data:`MAX_INPUT_CHARS`, so it is safe on any string.
"""

from __future__ import annotations

import re

MAX_INPUT_CHARS = 2000  # longer inputs are not answers; normalise() returns None for them

_TEXT_COMMANDS = re.compile(
    r"\\(?:mbox|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mathit|mathsf|operatorname|hbox)"
    r"(?![A-Za-z])"
)
_TEXT = re.compile(r"\\text\s*\{([^{}]*)\}")
_SIZES = re.compile(r"\\(?:left|right|[bB]igg?[lrm]?)(?![A-Za-z])\s*(?:\.(?![0-9]))?")
_THIN_SPACES = re.compile(r"(?<!\\)\\[,!;: ]|\\q?quad(?![A-Za-z])|~")
_FRAC_ALIASES = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])|\^\s*\{\s*\}")
_PERCENT = re.compile(r"\\?%")
_DISPLAYSTYLE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])")
_ALIASES = [
    (re.compile(r"\\(?:leq?|leqslant)(?![A-Za-z])"), r"\\le "),
    (re.compile(r"\\(?:geq?|geqslant)(?![A-Za-z])"), r"\\ge "),
    (re.compile(r"\\(?:neq?)(?![A-Za-z])"), r"\\ne "),
    (re.compile(r"\\(?:varnothing|emptyset)(?![A-Za-z])|\\\{\s*\\\}"), r"\\emptyset "),
    (re.compile(r"\\(?:infin|infinity)(?![A-Za-z])"), r"\\infty "),
    (re.compile(r"\\(?:cdot|times)(?![A-Za-z])"), r"\\cdot "),
    (re.compile(r"\\(?:dots|cdots|ldots)(?![A-Za-z])"), r"\\dots "),
]
# \frac12, \frac1{2}, \frac{1}2, \sqrt2: brace the single-character arguments.
_FRAC_SHORT = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])")
_FRAC_SHORT_FIRST = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*\{")
_FRAC_SHORT_SECOND = re.compile(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])")
_SQRT_SHORT = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")
_SPACE_AFTER_COMMAND = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_SPACE = re.compile(r"\s+")
_LONE_NUMBER_WITH_COMMAS = re.compile(r"[-+]?\$?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_UNIT = re.compile(
    r"(?P<num>[-+]?\s*(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?)\s+"
    r"(?P<unit>[A-Za-z]{2,}(?:[ /.-]+[A-Za-z]+)*(?:\^\d)?)\.?"
)
_MIXED_PLAIN = re.compile(r"(?<![\d.])(\d+)\s+(\d+)\s*/\s*(\d+)(?![\d.])")
_WORDS = re.compile(r"[A-Za-z][A-Za-z '-]*")
_BRACED_COMMA = re.compile(r"\{\s*,\s*\}")
_IN_PREFIX = re.compile(r"^[A-Za-z]\s*\\in(?![A-Za-z])\s*")
_OR_AND = re.compile(r"\\text\{\s*(?:or|and)\s*\}|\s(?:or|and)\s")


def _matching_brace(text: str, open_index: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_index``, or -1."""
    depth = 0
    for i in range(open_index, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i
    return -1


def _strip_delimiters(text: str) -> str:
    """``$x$``, ``\\(x\\)``, ``\\[x\\]``, a whole-answer ``\\boxed{x}`` -> ``x``, repeatedly."""
    while True:
        before = text
        text = text.strip().rstrip(".").rstrip()  # "$x$." and "\\(x\\)." too
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            wrapped = text.startswith(left) and text.endswith(right)
            if wrapped and len(text) >= len(left) + len(right):
                inner = text[len(left) : len(text) - len(right)]
                if left != "$" or "$" not in inner.replace("\\$", ""):
                    text = inner.strip()
        for command in ("\\boxed", "\\fbox"):
            if text.startswith(command):
                start = len(command)
                while start < len(text) and text[start] == " ":
                    start += 1
                if start < len(text) and text[start] == "{":
                    end = _matching_brace(text, start)
                    if end == len(text) - 1:
                        text = text[start + 1 : end]
        if text == before:
            return text


def _normalise_text_content(match: re.Match) -> str:
    """``\\text{ Inches }`` -> ``\\text{inches}``: words lower-cased, spaces collapsed."""
    words = " ".join(match.group(1).replace("\\", " ").split()).lower()
    return "\\text{" + words + "}"


def normalise(answer: str | None) -> str | None:
    """The normal form of ``answer`` (None when there is none or it is too long to be one)."""
    if answer is None or len(answer) > MAX_INPUT_CHARS:
        return None
    text = answer.replace("\u200b", "").replace("\u00a0", " ").replace("\u2212", "-")
    text = _strip_delimiters(text)
    if _WORDS.fullmatch(text):  # a text answer: "Blue  Whale" -> "blue whale"
        return " ".join(text.split()).lower()
    text = text.replace("\\$", "").replace("$", "")
    text = _DISPLAYSTYLE.sub("", text)
    text = _TEXT_COMMANDS.sub(r"\\text", text)
    text = _SIZES.sub("", text)
    text = _THIN_SPACES.sub(" ", text)
    text = _FRAC_ALIASES.sub(r"\\frac", text)
    text = _DEGREES.sub("", text)
    text = _PERCENT.sub("", text)
    for pattern, replacement in _ALIASES:
        text = pattern.sub(replacement, text)
    text = text.strip()
    while text.endswith("."):  # a sentence's period, or "5." for 5
        text = text[:-1].rstrip()
    if _LONE_NUMBER_WITH_COMMAS.fullmatch(text):
        text = text.replace(",", "")
    text = _BRACED_COMMA.sub("", text)
    plain = _PLAIN_UNIT.fullmatch(text)
    if plain:  # "18 dollars", "7 km/h": the unit as \text{}
        text = f"{plain['num']}\\text{{{plain['unit']}}}"
    text = _MIXED_PLAIN.sub(r"\1\\frac{\2}{\3}", text)  # "2 3/4" -> 2\frac{3}{4}, a mixed number
    text = _OR_AND.sub(",", text)
    text = _IN_PREFIX.sub("", text)
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_SHORT_FIRST.sub(r"\\frac{\1}{", text)
    text = _FRAC_SHORT_SECOND.sub(r"\\frac\1{\2}", text)
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = _SPACE_AFTER_COMMAND.sub("\\1\x00", text)  # keep "\pi r" apart
    text = _TEXT.sub(_normalise_text_content, text)
    text = text.replace("\\text{", "\x01")  # protect the spaces inside \text{}
    parts = text.split("\x01")
    out = [_SPACE.sub("", parts[0])]
    for part in parts[1:]:
        close = part.find("}")
        if close < 0:
            out.append("\\text{" + _SPACE.sub("", part))
        else:
            out.append("\\text{" + part[:close] + "}" + _SPACE.sub("", part[close + 1 :]))
    text = "".join(out).replace("\x00", " ")
    return text or None
