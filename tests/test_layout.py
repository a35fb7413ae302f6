"""The code's map stays true: every module says what it may import, and the "Layout of the
code" table of docs/architecture.md lists every module of the runtime and the converter (the import direction itself
is checked by `lint-imports`, see pyproject.toml); the README stays a short front door whose links
to docs/ lead somewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p for package in ("santacpu", "quantize") for p in (REPO / package).rglob("*.py"))


def test_every_module_says_what_it_may_import():
    missing = [
        str(p.relative_to(REPO))
        for p in MODULES
        if "May import:" not in (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "")
    ]
    assert not missing, f"modules whose docstring has no 'May import:' line: {missing}"


def test_the_architecture_page_lists_every_module():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = page[page.index("# Layout of the code") :]
    unlisted = [
        str(p.relative_to(REPO))
        for p in MODULES
        if p.name != "__init__.py" and f"`{p.relative_to(REPO).as_posix()}`" not in table
    ]
    assert not unlisted, f"modules missing from docs/architecture.md's layout table: {unlisted}"


def test_the_readme_is_short_and_its_links_resolve():
    readme = REPO / "README.md"
    assert readme.stat().st_size < 15_000, "README.md is the front door: details go to docs/"
    pages = [readme, *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"
