"""Progress of long work (loading a model, quantizing, scoring, evaluating) on stderr: one line
rewritten in place where stderr is a terminal; where it is not (a log, a pipe), whole lines, at
most one every `LOG_INTERVAL_S` seconds and none for work that ends sooner, so that a log shows
long work moving without filling up with short work's lines. The latest one is also readable in
process (`latest`), for a server's `/health` while its model loads.

May import: the standard library only.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 5.0  # where stderr is not a terminal: at most one progress line this often


class Progress:
    """`step(what)` once per unit of work; the line ends when `total` steps are done. `clock`
    (seconds, default `time.perf_counter`) is replaceable for tests."""

    def __init__(self, total: int, label: str, stream=None, clock=time.perf_counter):
        global _latest
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream)
        self.clock = clock
        self.start = clock()
        self._last_line = self.start  # log mode: when the last line was written (none yet: the start)
        self._logged = False
        self._width = 0
        _latest = self

    def step(self, what: str = "") -> None:
        self.done += 1
        now = self.clock()
        elapsed = now - self.start
        text = f"{self.label}: {self.done}/{self.total} {what} {elapsed:.1f} s".replace("  ", " ")
        if self.live:
            # The whole of `what` (a task id is read whole); spaces clear a longer line before it.
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self._last_line >= LOG_INTERVAL_S or (self._logged and self.done >= self.total):
            self.stream.write(f"santacpu: {text}\n")
            self.stream.flush()
            self._last_line, self._logged = now, True


def end_open_line() -> None:
    """End a terminal's progress line that work cut short (an error, Ctrl-C) left open, so the
    next message starts a line of its own."""
    progress = _latest
    if progress is not None and progress.live and progress._width and progress.done < progress.total:
        try:
            progress.stream.write("\n")
            progress.stream.flush()
        except (OSError, ValueError):  # (a stream closed meanwhile)
            pass
        progress._width = 0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_latest: Progress | None = None  # the last one started


def latest(since: float) -> dict | None:
    """The last progress started at or after `since` (a `time.perf_counter()` value) and not yet
    done, as {"step", "done", "total", "elapsed_s"}; None if there is none."""
    progress = _latest
    if progress is None or progress.start < since or progress.done >= progress.total:
        return None
    elapsed = round(time.perf_counter() - progress.start, 1)
    return {"step": progress.label, "done": progress.done, "total": progress.total, "elapsed_s": elapsed}
