"""Sample code at hand on every machine: the running interpreter's standard library sources, in
a fixed order (quantization's default calibration text, the bench's prompts).

May import: the standard library only.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, in a fixed order (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
