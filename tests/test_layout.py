"""The code's map stays true: every module says what it may import, and the README's "Layout of
the code" table lists every module of the runtime and the converter (the import direction itself
is checked by `lint-imports`, see pyproject.toml)."""

from __future__ import annotations

import ast
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


def test_the_readme_lists_every_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout of the code") :]
    unlisted = [
        str(p.relative_to(REPO))
        for p in MODULES
        if p.name != "__init__.py" and f"`{p.relative_to(REPO).as_posix()}`" not in table
    ]
    assert not unlisted, f"modules missing from the README's layout table: {unlisted}"
