"""Writing a file so that readers never see part of it: a hidden temporary file in the target's
folder (`.NAME.XXXX.partial`), renamed over the target only once complete.

Every writer of santacpu's output files (quantized models, `--json` reports) goes through here,
so each gets the same guarantees: on any failure or interruption (an exception, Ctrl-C, or the
CLI's SIGTERM handler) the temporary file is removed; the file gets the usual mode for new
files (0666 less the umask, not mkstemp's 0600); and a failing write (no permission, read-only
file system, disk full) is a one-line `WriteError`.

May import: `santacpu.errors`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import WriteError, os_problem


def check_writable(path: str | os.PathLike, what: str = "") -> None:
    """Fail now, before any long work, if `path` cannot be written as a new or replaced file."""
    path = Path(path)
    label = f"{what} {path}".strip()
    folder = path.parent
    if path.is_dir():
        raise WriteError(f"cannot write {label}: it is a folder")
    if not folder.is_dir():
        raise WriteError(f"cannot write {label}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(f"cannot write {label}: the folder {folder} is not writable")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_output(path) as f: f.write(...)`: `path` appears, complete, when the block
    ends without an error; otherwise nothing is left behind. OSErrors raised inside the block are
    taken as write errors (the block's job is writing)."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as problem:
        raise WriteError(f"cannot write {path}: {os_problem(problem)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        os.replace(tmp_name, path)
    except BaseException as problem:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(problem, OSError):
            raise WriteError(f"cannot write {path}: {os_problem(problem)}") from None
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_output`."""
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
