"""Every relative link in the README and docs/ leads to a file that exists, and to a heading
that exists in it; the dependencies page names every runtime dependency."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (their brackets are not links)."""
    return _FENCE.sub("", page.read_text(encoding="utf-8"))


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", _prose(page), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_anchors_are_made_as_github_makes_them(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# The `lmtier` command\n## Use with vLLM\n## A, b (c.py)\n## A, b (c.py)\n")
    assert anchors(page) == {"the-lmtier-command", "use-with-vllm", "a-b-cpy", "a-b-cpy-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert broken == []


def test_the_pages_link_somewhere() -> None:
    assert sum(len(_LINK.findall(_prose(page))) for page in PAGES) > 50


def test_dependencies_md_names_every_runtime_dependency() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    names = [re.split(r"[<>=!~\[; ]", spec)[0] for spec in pyproject["project"]["dependencies"]]
    text = (REPO / "docs" / "dependencies.md").read_text(encoding="utf-8").lower()
    assert "prometheus-client" in names
    assert [name for name in names if name.lower() not in text] == []
