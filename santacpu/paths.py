"""Paths as a user writes them: `~` and `~user` expanded, where a user that does not exist is an
error in words (Python raises a RuntimeError there).

May import: `santacpu.errors`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SantacpuError


def user_path(value: str | os.PathLike) -> Path:
    """`value` as a Path, `~` and `~user` expanded."""
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~nouser/...: no home folder to put there
        raise SantacpuError(f"cannot expand {os.fspath(value)!r}: no user {str(value).split('/')[0][1:]!r} on this "
                            "machine") from None
