"""Turning a stream of generated token ids into text: whole UTF-8 characters only, cut at the
user's stop strings (which are not themselves emitted); special tokens (EOS, the FIM tokens) are
markup, never text, as in the server's answers.

May import: `santacpu.tokenizer`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..tokenizer import StreamDecoder, Tokenizer


class StopStrings:
    """Feed text pieces; get back what is safe to show. Text that might be the start of a stop
    string is held back until it is known not to be one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched = ""  # the stop string that ended the text

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            at, self.matched = min(hits)
            out, self.pending = self.pending[:at], ""
            return out
        hold = self._partial_match_length()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_match_length(self) -> int:
        """Length of the longest end of `pending` that is a proper start of some stop string.
        Only the places where a stop's first character occurs are tried, longest end first, so a
        push costs about the stops' total length, not its square."""
        pending, best = self.pending, 0
        for stop in self.stops:
            at = pending.find(stop[0], max(0, len(pending) - len(stop) + 1))
            while 0 <= at < len(pending) - best:
                if stop.startswith(pending[at:]):
                    best = len(pending) - at
                    break
                at = pending.find(stop[0], at + 1)
        return best


def stream_text(tokenizer: Tokenizer, ids: Iterator[int], stops: Iterable[str] = ()) -> Iterator[str]:
    """Text pieces for generated ids, stopping (and closing `ids`) at the first stop string."""
    decoder = StreamDecoder(tokenizer)
    stopper = StopStrings(stops)
    special = tokenizer.special_ids
    try:
        for token_id in ids:
            if token_id in special:
                continue
            piece = stopper.push(decoder.push(token_id))
            if piece:
                yield piece
            if stopper.stopped:
                return
        tail = stopper.push(decoder.flush())
        tail += stopper.flush()
        if tail:
            yield tail
    finally:
        close = getattr(ids, "close", None)
        if close:
            close()
