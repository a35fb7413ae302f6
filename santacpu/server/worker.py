"""The server's one generation thread: it drives the model's `BatchScheduler` while any sequence is
queued or running, and hands each sequence's tokens to the asyncio side as they come.

HTTP handlers never run the model: they `submit` a sequence and read its `TokenFeed` (an
asyncio queue filled from this thread through the event loop's `call_soon_threadsafe`), so a slow
reader never stalls the others and a request nobody waits for is cancelled at its next step.

May import: `santacpu.generation`, `santacpu.errors` (no HTTP library: the app owns that).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections.abc import Sequence

from ..generation.batch import BatchScheduler, BatchSequence
from ..errors import SantacpuError
from ..generation.options import GenerationOptions

_END = None  # the feed's last item: the sequence has ended


class ShuttingDown(SantacpuError):
    """A sequence submitted after `GenerationWorker.close`."""


class TokenFeed:
    """One sequence's tokens on the event loop's side: `await next_tokens()` gives the next list of
    tokens, or None once the sequence has ended (finished or cancelled)."""

    def __init__(self, sequence: BatchSequence, loop: asyncio.AbstractEventLoop):
        self.sequence = sequence
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    async def next_tokens(self) -> list[int] | None:
        return await self.queue.get()

    def cancel(self) -> None:
        """Nobody waits for more: the scheduler drops the sequence at its next step."""
        self.sequence.cancel()


class GenerationWorker:
    """The thread that runs the scheduler (see the module docstring)."""

    def __init__(self, scheduler: BatchScheduler):
        self.scheduler = scheduler
        self._feeds: dict[int, TokenFeed] = {}  # by sequence index
        self._wake = threading.Condition()
        self._stopping = False
        self._closed = False  # shutting down: no new sequences
        self._thread = threading.Thread(target=self._run, name="santacpu-generation", daemon=True)
        self._thread.start()

    def submit(self, ids: Sequence[int], options: GenerationOptions, n: int = 1) -> list[TokenFeed]:
        """Queue `n` sequences of `ids` (errors as `BatchScheduler.submit`: bad input, full queue)."""
        loop = asyncio.get_running_loop()
        with self._wake:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            sequences = self.scheduler.submit(ids, options, n)
            feeds = [TokenFeed(s, loop) for s in sequences]
            for feed in feeds:
                self._feeds[feed.sequence.index] = feed
            self._wake.notify()
        return feeds

    def close(self) -> None:
        """Refuse new sequences and cancel every one in flight: each ends at the next step, its
        request answered with what it has (without waiting for the thread). Safe in a signal
        handler: the lock is reentrant."""
        with self._wake:
            self._closed = True
            for feed in self._feeds.values():
                feed.cancel()
            self._wake.notify()

    def stop(self) -> None:
        """Cancel every sequence, end every feed, and let the thread finish its step and exit."""
        with self._wake:
            self._stopping = True
            for feed in self._feeds.values():
                feed.cancel()
            self._wake.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.pending:
                    self._wake.wait()
                if self._stopping and not self.scheduler.pending:
                    return
            for event in (self.scheduler.admit, self.scheduler.step):  # first tokens before the batched step
                try:
                    events = event()
                except Exception:  # noqa: BLE001 (a bug, or memory: every request gets what it has)
                    print(f"santacpu serve: internal error in generation, every request in flight ended:\n"
                          f"{traceback.format_exc()}", file=sys.stderr, flush=True)
                    events = self.scheduler.abandon()
                for sequence, tokens in events:
                    self._deliver(sequence, tokens)

    def _deliver(self, sequence: BatchSequence, tokens: list[int]) -> None:
        with self._wake:
            feed = self._feeds.get(sequence.index)
            if feed is None:
                return
            if sequence.done:
                del self._feeds[sequence.index]
        if tokens:
            feed.loop.call_soon_threadsafe(feed.queue.put_nowait, list(tokens))
        if sequence.done:
            feed.loop.call_soon_threadsafe(feed.queue.put_nowait, _END)
