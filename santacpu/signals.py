"""Ctrl-C and SIGTERM held over a short section that must not be cut in two: files taking their
names together (`random-checkpoint`), a child process starting (`bench`).

May import: the standard library.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_HELD = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def signals_held(children_ignore_sigint: bool = False):
    """SIGINT and SIGTERM blocked on the main thread while the block runs, delivered when it ends
    (not lost). With `children_ignore_sigint`, children started meanwhile ignore SIGINT from their
    first instruction (an ignored signal stays ignored across exec, and Python then installs no
    handler of its own), until they unblock it themselves: a child inherits the blocked mask.
    Elsewhere than on the main thread it does nothing (the dispositions are not ours there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if children_ignore_sigint else None
    try:
        yield
    finally:
        if children_ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # (None: set outside Python)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
