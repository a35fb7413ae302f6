"""One progress line on stderr for long work (loading a model, quantizing): shown only when
stderr is a terminal, so logs and pipes stay clean. The latest one is also readable in process
(`latest`), for a server's `/health` while its model loads.

May import: the standard library only.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """`step(what)` once per unit of work; the line ends when `total` steps are done."""

    def __init__(self, total: int, label: str, stream=None):
        global _latest
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.start = time.perf_counter()
        _latest = self

    def step(self, what: str = "") -> None:
        self.done += 1
        if self.live:
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r{self.label}: {self.done}/{self.total} {what:<32.32} {elapsed:6.1f} s")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


_latest: Progress | None = None  # the last one started


def latest(since: float) -> dict | None:
    """The last progress started at or after `since` (a `time.perf_counter()` value) and not yet
    done, as {"step", "done", "total", "elapsed_s"}; None if there is none."""
    progress = _latest
    if progress is None or progress.start < since or progress.done >= progress.total:
        return None
    elapsed = round(time.perf_counter() - progress.start, 1)
    return {"step": progress.label, "done": progress.done, "total": progress.total, "elapsed_s": elapsed}
