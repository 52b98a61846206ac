"""The README and the docs stay true to the code: every setting is documented, every link stays
inside the repository, and the README leads to each page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from governance.settings import GovernanceSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: The pages the README must link (each named for its reader).
DOCS = ["configuration.md", "operating.md", "trust.md", "performance.md", "design.md"]


def links(text: str) -> list[str]:
    """The targets of the page's Markdown links, without their ``#fragment``."""
    return re.findall(r"\]\(([^)#\s]*)(?:#[^)]*)?\)", text)


def anchors(page: Path) -> set[str]:
    """The ``#fragment`` of each heading of a Markdown page, as GitHub makes them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def test_the_settings_table_lists_every_setting_and_no_other() -> None:
    start = CONFIGURATION.index("\n## Settings\n")
    end = CONFIGURATION.find("\n## ", start + 1)
    section = CONFIGURATION[start : end if end != -1 else len(CONFIGURATION)]
    documented = set(re.findall(r"^\| `(GOVERNANCE_[A-Z_]+)` \|", section, flags=re.M))
    expected = {f"GOVERNANCE_{name.upper()}" for name in GovernanceSettings.model_fields}
    assert documented == expected


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links_point_inside_the_repository_at_files_that_exist(page: Path) -> None:
    local = [t for t in links(page.read_text(encoding="utf-8")) if "://" not in t]
    if page.name == "README.md":
        assert local, "the README links the docs, at least"
    for target in local:
        if not target:  # a link to a heading of the page itself
            continue
        assert not target.startswith("/"), f"{page.name}: {target}: absolute"
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target}: outside the repository"
        assert resolved.exists(), f"{page.name}: {target}: no such file"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links_to_a_heading_find_it(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target, fragment in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = (page.parent / target).resolve() if target else page
        if linked.suffix == ".md" and linked.exists():
            assert fragment in anchors(linked), f"{page.name}: {target}#{fragment}: no such heading"


def test_the_readme_never_links_above_its_folder() -> None:
    assert not [t for t in links(README) if t.startswith("..")]


@pytest.mark.parametrize("name", DOCS)
def test_the_readme_links_each_docs_page(name: str) -> None:
    assert f"docs/{name}" in links(README), f"the README does not link docs/{name}"
