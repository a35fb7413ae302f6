"""User-facing errors and warnings.

`SantacpuError` is the one exception type that the CLI turns into a single line on stderr and a
non-zero exit; anything else escaping is a bug and keeps its traceback.
"""


class SantacpuError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class SantacpuWarning(UserWarning):
    """Something the user should know about but that does not stop the work (prompt trimmed, ...)."""
