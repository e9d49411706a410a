"""The documentation stands on its own: every relative link in README.md, docs/ and bench/ resolves
to a file of this repository (and a ``#fragment`` to a heading of it), and nothing points outside
the repository, where a user who clones it has nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "bench" / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "bench" / "results").glob("*.md"),
    ]
)
# Pages another engineer is writing while these links already point to them: a link to one is not
# checked while it is missing. Remove a path once it has landed.
PENDING: set[Path] = set()

LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    """Inline links and images outside code; reference definitions (``[x]: target``) too."""
    text = FENCE.sub("", text)
    # A code span is text, not a link; in [`name`](target) only the link text is code.
    targets = [m.group(1) for m in LINK.finditer(CODE.sub("x", text))]
    targets += re.findall(r"^ {0,3}\[[^\]]+\]:[ \t]*<?([^\s>]+)>?", text, re.MULTILINE)
    return targets


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def problems(page: Path) -> list[str]:
    found = []
    text = page.read_text()
    if re.search(r"\.\./shared\b|DESIGN\.md", text):
        found.append("names ../shared or DESIGN.md, which is not in the repository")
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if "shared" in Path(path_part).parts:
            found.append(f"{target}: points to ../shared")
            continue
        if not resolved.is_relative_to(ROOT):
            found.append(f"{target}: outside the repository")
            continue
        if resolved in PENDING and not resolved.exists():
            continue
        if not resolved.exists():
            found.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            found.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    assert problems(page) == []


def test_the_check_catches_a_broken_link_and_a_link_to_shared(tmp_path, monkeypatch):
    page = ROOT / "docs" / "_probe_never_written.md"
    text = (
        "[ok](architecture.md) [anchor](architecture.md#redis-keys) `[code](nowhere.md)`\n"
        "[broken](nowhere.md) [bad anchor](architecture.md#no-such-heading)\n"
        "[shared](../../shared/DESIGN.md) [outside](../../elsewhere.md)\n"
        "```\n[fenced](also-nowhere.md)\n```\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == page else _read(self))
    found = problems(page)
    assert any(p.startswith("nowhere.md: no such file") for p in found)
    assert any("no heading #no-such-heading" in p for p in found)
    assert any(p.startswith("../../shared/DESIGN.md: points to ../shared") for p in found)
    assert any(p.startswith("../../elsewhere.md: outside") for p in found)
    assert any("names ../shared or DESIGN.md" in p for p in found)
    assert not any("also-nowhere" in p or "architecture.md:" in p.split()[0] for p in found)
    assert len(found) == 5


_read = Path.read_text
