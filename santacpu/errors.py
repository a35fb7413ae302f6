"""User-facing errors and warnings.

`SantacpuError` is the one exception type that the CLI turns into a single line on stderr and a
non-zero exit; anything else escaping is a bug and keeps its traceback.

May import: the standard library only (the bottom layer).
"""

from __future__ import annotations

import os


class SantacpuError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class WriteError(SantacpuError):
    """A file could not be written (no permission, read-only file system, disk full, ...);
    callers that know what the file is for (the quantization cache) add their own advice, by
    `errno` where the system gave one."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class OptionValueError(SantacpuError):
    """A value the command line could not judge by itself, wrong for this model or this choice (a
    size target below the smallest file the model makes): the CLI exits 2 for it, as for a value
    its parser refuses."""


class SantacpuWarning(UserWarning):
    """Something the user should know about but that does not stop the work (prompt trimmed, ...)."""


def os_problem(problem: OSError) -> str:
    """An OSError's reason in words ("Permission denied"), without Python's "[Errno 13]" prefix."""
    return problem.strerror or (os.strerror(problem.errno) if problem.errno else str(problem))


def printable(text: str) -> str:
    """`text` with its control and format characters (newlines, terminal escapes, bidirectional
    overrides) written as escapes: a value read from a hostile file stays on its line of a message
    and cannot drive the terminal that shows it."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def warning_line(message, category: type, filename: str) -> str:
    """A warning as the one line santacpu prints: its own as they are; a library's (Ray's) with the
    library's name."""
    if issubclass(category, SantacpuWarning):
        return f"santacpu: warning: {printable(str(message))}"
    library = os.path.splitext(os.path.basename(filename))[0] if "site-packages" not in filename else \
        filename.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0]
    text = printable(" ".join(str(message).split()))
    return f"santacpu: warning: ({library}, {category.__name__}) {text}"
