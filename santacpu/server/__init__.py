"""`santacpu serve`: a local completion server that editors already speak to (llama.cpp's
`/infill` and `/completion`, OpenAI's `/v1/completions` with `suffix`, Ollama's `/api/generate`;
a prompt in any client's FIM template fills in the middle), thin over the library: the requests
run through the model's batch scheduler on one generation thread.

Needs the `serve` extra (Starlette, uvicorn, sse-starlette), imported only when a server starts:
`pip install "santacpu[serve]"`.

May import: `santacpu.model`, `santacpu.generation`, `santacpu.errors`; starlette, uvicorn and
sse_starlette lazily (never `quantize`, never the CLI).
"""

from __future__ import annotations

import dataclasses
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable

from ..errors import SantacpuError, os_problem

SERVE_EXTRA_HINT = 'santacpu serve needs the "serve" extra: pip install "santacpu[serve]"'


def _require_http_stack() -> None:
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SantacpuError(f"{SERVE_EXTRA_HINT} ({e.name} is missing)") from None


def build_app(
    settings, load_model: Callable, on_load_failure: Callable[[str], None] = lambda message: None, load_in_background: bool = True
):
    """The server's ASGI app (see `santacpu.server.app`); the model loads when the app starts
    (unless `load_in_background` is False: then the caller runs `app.state.santacpu.load()`)."""
    _require_http_stack()
    from .app import create_app

    return create_app(settings, load_model, on_load_failure, load_in_background)


def uvicorn_server(app, host: str, port: int):
    """A uvicorn server for `app` whose exit signal (SIGINT, SIGTERM) first ends every in-flight
    generation, so each request is answered with what it has and a stop reason, then stops as
    uvicorn does (open connections finish, then the app's shutdown)."""
    import uvicorn

    from .connections import timed_protocol_class

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.santacpu.begin_shutdown()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                 http=timed_protocol_class()))


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a one-line error (the port in use, an address not of
    this machine): checked before anything loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on accepted sockets only then, and without
    # it every keep-alive request after the first waited ~44 ms (Nagle against delayed ACKs).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, UnicodeError) as problem:  # UnicodeError: a host name IDNA cannot encode
        sock.close()
        reason = os_problem(problem) if isinstance(problem, OSError) else "not a host name"
        raise SantacpuError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _more_descriptors() -> None:
    """The soft limit on open files raised to the hard one: each client holds one (a common soft
    limit of 1,024 is few for a server), and the connections' own timeouts bound how long."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    except (OSError, ValueError):  # (a container that refuses: the soft limit stays)
        pass


def run_server(settings, load_model: Callable, host: str, port: int) -> None:
    """Listen first, then load the model in this thread (a first-use quantization may take
    minutes; Ctrl-C during it cleans up as anywhere in the CLI) while `/health` answers 503
    "loading"; then serve until SIGINT/SIGTERM. The HTTP server runs on its own thread, so those
    signals arrive here, as KeyboardInterrupt or the CLI's own exception, and end it cleanly."""
    _require_http_stack()
    _more_descriptors()
    sock = listening_socket(host, port)
    app = build_app(dataclasses.replace(settings, host=host), load_model, load_in_background=False)
    server = uvicorn_server(app, host, port)
    # An event, not Thread.join: a signal that interrupts join(timeout) on Python 3.11 leaves the
    # thread marked as ended while it runs, and the process then exited with requests in flight.
    stopped = threading.Event()

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            stopped.set()

    thread = threading.Thread(target=serve, name="santacpu-http", daemon=True)
    print(f"santacpu serve: http://{host}:{port} (loading {settings.model_name}; /health says when it is ready)", flush=True)
    thread.start()
    try:
        while not server.started and not stopped.is_set():
            time.sleep(0.01)
        if not server.started:
            raise SantacpuError(f"could not serve on {host}:{port}")
        state = app.state.santacpu
        state.load()
        print(f"santacpu serve: ready: {settings.model_name} on {state.model.device}, loaded in {state.load_seconds:.1f} s",
              flush=True)
        while not stopped.wait(0.5):  # in slices: a signal's handler runs between them
            pass
    except BaseException:
        server.handle_exit(signal.SIGINT, None)  # requests in flight end now with what they have
        stopped.wait(timeout=30)
        raise
    finally:
        sock.close()
