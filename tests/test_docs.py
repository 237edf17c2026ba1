"""The README stays a first screen and every page it sends a reader to exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_BYTES = 15_000  # issue 20: a newcomer reads it in two minutes; the rest lives in docs/
LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)]*))?\)")  # Markdown link: (target, anchor or "")


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section."""
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _local_links(page: Path) -> list[tuple[str, str]]:
    """(target, anchor) of every link to a file of the repository."""
    return [link for link in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in link[0]]


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)  # code is no heading
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_readme_is_at_most_15_kb() -> None:
    assert len(README.read_bytes()) <= MAX_README_BYTES


def test_quick_start_holds_exactly_the_demo_and_the_test_command() -> None:
    blocks = re.findall(r"```\n(.*?)```", _section(README.read_text(encoding="utf-8"), "Quick start"), re.S)
    assert len(blocks) == 2
    assert blocks[0].strip().endswith("fishseg demo --out fishseg-demo")
    assert blocks[1].strip().endswith("python -m pytest -q")


@pytest.mark.parametrize("page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda page: page.name)
def test_every_local_link_resolves(page: Path) -> None:
    missing = [target for target, _ in _local_links(page) if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
    broken = [f"{target}#{anchor}" for target, anchor in _local_links(page) if anchor and target.endswith(".md")
              and (page.parent / target).exists() and anchor not in _anchors(page.parent / target)]
    assert not broken, f"{page.name} links to missing headings: {broken}"


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    linked = {(REPO / target).resolve() for target, _ in _local_links(README)}
    pages = {page.resolve() for page in (REPO / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages the README never links: {sorted(p.name for p in pages - linked)}"
