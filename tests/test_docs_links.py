"""Every relative link of the README and the docs resolves to a file of the repository,
and the README's first screen holds the two set-up commands. No JAX."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "BUILD.md", *(ROOT / "docs").glob("*.md")]
)
# [text](target) and [text]: target, not inside code spans or fences.
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def links(text):
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return [*INLINE.findall(text), *REFERENCE.findall(text)]


def _is_relative(target):
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) and not target.startswith(
        "#"
    )


def test_the_link_finder_finds_links_and_skips_code():
    text = (
        "see [a](docs/a.md#x) and ![b](b.png)\n`[no](x.md)`\n```\n[no](y.md)\n```\n[r]: ../r.md\n"
    )
    assert links(text) == ["docs/a.md#x", "b.png", "../r.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in links(document.read_text()):
        if not _is_relative(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (document.parent / path).resolve()
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: links to nothing in the repo: {broken}"


def test_the_docs_are_linked_from_the_readme():
    readme = links((ROOT / "README.md").read_text())
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs the README does not link to: {unlinked}"


def test_the_first_screen_holds_the_two_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "pip install -r requirements.txt && python launch/train.py" in first_screen
    assert "pip install -r requirements-dev.txt && python -m pytest" in first_screen
