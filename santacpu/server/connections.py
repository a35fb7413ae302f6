"""The server's HTTP connections: uvicorn's h11 protocol with the timeouts it lacks, and the event
loop's accept errors said once a minute.

- Headers: a connection must start each request (finish its headers) within HEADER_TIMEOUT_S of
  opening, or of its previous answer. Sockets that sent nothing, or headers a byte at a time, were
  held open for ever: 1,100 of them used up the process's descriptors and locked every client out.
- Writes: a client that takes none of an answer for WRITE_STALL_TIMEOUT_S, while the answer waits
  beyond the transport's buffer (over its high-water mark), is cut off, and the answer freed
  (unread 13 MB answers stayed in memory for as long as their clients kept the sockets open).
- Pipelined requests: while an answer waits, h11 keeps what the client sends after its request; a
  client that pipelined requests and read nothing had the server hold 200 MB for it. Reading pauses
  while more than PIPELINED_BYTES_MAX are held (uvicorn resumes it as the requests are answered).
- Malformed HTTP: answered with the server's JSON error (llama.cpp's and OpenAI's shape), as
  every other refusal is, not uvicorn's plain text.
- Accept errors: out of descriptors, asyncio logged one traceback per waiting connection, again and
  again (229 MB of log in 35 s).

May import: uvicorn, h11 (lazily, as the rest of the server), the standard library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

HEADER_TIMEOUT_S = 10.0
WRITE_STALL_TIMEOUT_S = 30.0
PIPELINED_BYTES_MAX = 8 << 20  # (two of the largest request bodies)
ACCEPT_ERROR_EVERY_S = 60.0
MALFORMED_REQUEST_BODY = json.dumps(
    {"error": {"code": 400, "message": "the request is not valid HTTP/1.1", "type": "invalid_request_error"}}
).encode()


def timed_protocol_class() -> type:
    """uvicorn's h11 protocol with the header and write-stall timeouts and the bound on pipelined
    bytes."""
    import h11
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedFlow(FlowControl):
        """uvicorn's flow control, but reading stays paused while too many pipelined bytes wait:
        uvicorn resumes it whenever a request reads its body, 256 KiB more each time."""

        def __init__(self, transport, pipelined: Callable[[], int]) -> None:
            super().__init__(transport)
            self._pipelined = pipelined

        def resume_reading(self) -> None:
            if self._pipelined() <= PIPELINED_BYTES_MAX:
                super().resume_reading()

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow = BoundedFlow(transport, self._pipelined)  # (before any request's cycle takes it)
            self._stalled: asyncio.TimerHandle | None = None
            self._watch()

        def _waiting(self) -> bool:
            """Whether it waits for a request's headers (before its first, or after an answer)."""
            return self.cycle is None or self.cycle.response_complete

        def _watch(self) -> None:
            seen = (self.cycle, self._waiting())
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._check_started, seen)

        def _check_started(self, seen) -> None:
            """Close a connection that waited for a request the whole interval since the last check
            (one whose answer ended just now is watched one more interval)."""
            if self.transport.is_closing():
                return
            if seen == (self.cycle, True) and self._waiting():
                self.transport.close()
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._pipelined() > PIPELINED_BYTES_MAX and not self.transport.is_closing():
                self.flow.pause_reading()

        def _pipelined(self) -> int:
            """Bytes h11 holds that it has made no event of yet: requests sent after the one
            being answered (h11's own buffer; in an h11 without it, no bound)."""
            return len(getattr(self.conn, "_receive_buffer", b""))

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stalled is None:
                self._watch_writes()

        def _watch_writes(self) -> None:
            size = self.transport.get_write_buffer_size()
            self._stalled = self.loop.call_later(WRITE_STALL_TIMEOUT_S, self._check_written, size)

        def _check_written(self, size: int) -> None:
            """Cut off a client that took nothing of its answer since the last check (one that
            reads, however slowly, is watched on)."""
            if self.transport.get_write_buffer_size() < size:
                self._watch_writes()
            else:
                self.transport.abort()

        def resume_writing(self) -> None:
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None
            super().resume_writing()

        def send_400_response(self, msg: str) -> None:
            """The answer to bytes h11 cannot parse as a request: the JSON error, then close."""
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(MALFORMED_REQUEST_BODY)).encode())]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=MALFORMED_REQUEST_BODY), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None
            super().connection_lost(exc)

    return TimedH11Protocol


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Have `loop` say an accept error (out of descriptors or memory) at most once a minute; every
    other error goes to the handler it had."""
    default = loop.get_exception_handler()
    said = {"at": float("-inf")}

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "socket.accept() out of system resource" in str(context.get("message", "")):
            now = time.monotonic()
            if now - said["at"] < ACCEPT_ERROR_EVERY_S:
                return
            said["at"] = now
            logging.getLogger("santacpu.server").error(
                "out of descriptors or memory to accept connections (said once a minute): %s", context.get("exception")
            )
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
