"""One generated sequence as text, on the event loop: whole characters, cut at the stop rules
(`stop` strings, `n_indent`, `t_max_predict_ms`), with what the responses report (stop type,
token counts, timings). A stop rule that fires cancels the sequence, so the model does no work
nobody reads. Special tokens (EOS, the FIM tokens) are never rendered as text.

May import: `santacpu.generation`, `santacpu.tokenizer`, the server's `requests` and `worker`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..generation.text_stream import StopStrings
from ..tokenizer import StreamDecoder, Tokenizer
from .requests import Job
from .worker import TokenFeed


class IndentStop:
    """llama.cpp's `n_indent`: a new line indented less than `n_indent` ends the completion before
    that line. Each newline and the next line's indentation are held back until the line's first
    other character shows whether the line stays (then they are released) or ends the text."""

    def __init__(self, n_indent: int):
        self.n_indent = n_indent
        self.pending = ""  # a newline and the indentation after it, not yet known to stay
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.n_indent <= 0:
            return piece
        out = []
        text = piece
        while text and not self.stopped:
            if self.pending:  # at a line start: wait for its first character
                self.pending += text
                body = self.pending[1:].lstrip(" \t")
                if not body:
                    return "".join(out)
                if body[0] != "\n" and len(self.pending) - 1 - len(body) < self.n_indent:
                    self.stopped, self.pending = True, ""
                    break
                text, self.pending = self.pending[1:], ""
                out.append("\n")
                continue
            newline = text.find("\n")
            if newline < 0:
                out.append(text)
                break
            out.append(text[:newline])
            self.pending, text = "\n", text[newline + 1 :]
        return "".join(out)

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class CompletionText:
    """The text of one sequence (its `TokenFeed`) under `job`'s stop rules."""

    def __init__(self, feed: TokenFeed, tokenizer: Tokenizer, job: Job, submitted: float):
        self.feed = feed
        self.job = job
        self.decoder = StreamDecoder(tokenizer)
        self.special_ids = tokenizer.special_ids
        self.stops = StopStrings(job.options.stop)
        self.indent = IndentStop(job.n_indent)
        self.submitted = submitted
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.content: list[str] = []
        self.stop_type = "none"  # eos, limit, word: set when it ends
        self.stopping_word = ""
        self.saw_newline = False
        # Tokens the text was made of, up to the one that ended it (a stop string's last): what the
        # responses count, not the tokens the model went on to make before the cancel reached it.
        self.predicted = 0

    @property
    def sequence(self):
        return self.feed.sequence

    async def pieces(self) -> AsyncIterator[str]:
        """The completion's text, piece by piece; `stop_type` and the counts are set once it ends.
        Leaving early (a closed connection) cancels the sequence."""
        try:
            while (tokens := await self.feed.next_tokens()) is not None:
                self.first_token_at = self.first_token_at or time.perf_counter()
                for token in tokens:
                    self.predicted += 1
                    if token in self.special_ids:  # markup, not the editor's text
                        continue
                    piece = self._text(self.decoder.push(token))
                    if piece:
                        self.content.append(piece)
                        yield piece
                    if self.stop_type != "none":
                        self.feed.cancel()
                        break
                if self.stop_type != "none":
                    break
            tail = self._text(self.decoder.flush(), final=True)
            if tail:
                self.content.append(tail)
                yield tail
        finally:
            self.feed.cancel()  # no-op after a normal end; frees the slot after a disconnect
            self.ended_at = time.perf_counter()
            if self.stop_type == "none":
                reason = self.sequence.decoder.stop_reason
                self.stop_type = "eos" if reason in ("eos", "stop_id") else "limit"

    def _text(self, piece: str, final: bool = False) -> str:
        out = self.stops.push(piece)
        if final:
            out += self.stops.flush()
        if self.stops.stopped and self.stop_type == "none":
            self.stop_type = "word"
            self.stopping_word = self.stops.matched
        out = self.indent.push(out)
        if final:
            out += self.indent.flush()
        if self.indent.stopped and self.stop_type == "none":
            self.stop_type = "eos"  # llama.cpp reports an indentation stop as an end of generation
        self.saw_newline = self.saw_newline or "\n" in out
        limit = self.job.t_max_predict_ms
        if limit and self.saw_newline and self.stop_type == "none" and self.first_token_at is not None:
            if (time.perf_counter() - self.first_token_at) * 1000 > limit:
                self.stop_type = "limit"
        return out

    def text(self) -> str:
        return "".join(self.content)

    def timings(self) -> dict:
        stats = self.sequence.stats
        first = self.first_token_at or self.ended_at or self.submitted
        prompt_ms = (first - self.submitted) * 1000
        predicted_ms = ((self.ended_at or first) - first) * 1000
        predicted = self.predicted
        return {
            "prompt_n": stats.computed_tokens,
            "cache_n": stats.reused_tokens,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / stats.computed_tokens if stats.computed_tokens else 0.0,
            "prompt_per_second": 1000 * stats.computed_tokens / prompt_ms if prompt_ms > 0 else 0.0,
            "predicted_n": predicted,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted if predicted else 0.0,
            "predicted_per_second": 1000 * predicted / predicted_ms if predicted_ms > 0 else 0.0,
        }
