"""`santacpu serve`: a local completion server that editors already speak to (llama.cpp's
`/infill` and `/completion`, OpenAI's `/v1/completions` with `suffix`), thin over the library: the
requests run through the model's batch scheduler on one generation thread.

Needs the `serve` extra (Starlette, uvicorn, sse-starlette), imported only when a server starts:
`pip install "santacpu[serve]"`.

May import: `santacpu.model`, `santacpu.generation`, `santacpu.errors`; starlette, uvicorn and
sse_starlette lazily (never `quantize`, never the CLI).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SantacpuError

SERVE_EXTRA_HINT = 'santacpu serve needs the "serve" extra: pip install "santacpu[serve]"'


def _require_http_stack() -> None:
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SantacpuError(f"{SERVE_EXTRA_HINT} ({e.name} is missing)") from None


def build_app(settings, load_model: Callable, on_load_failure: Callable[[str], None] = lambda message: None):
    """The server's ASGI app (see `santacpu.server.app`); the model loads when the app starts."""
    _require_http_stack()
    from .app import create_app

    return create_app(settings, load_model, on_load_failure)


def uvicorn_server(app, host: str, port: int):
    """A uvicorn server for `app` whose exit signal (SIGINT, SIGTERM) first ends every in-flight
    generation, so each request is answered with what it has and a stop reason, then stops as
    uvicorn does (open connections finish, then the app's shutdown)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.santacpu.begin_shutdown()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def run_server(settings, load_model: Callable, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; a model that fails to load ends the server with its error."""
    _require_http_stack()
    import uvicorn

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def failed(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = build_app(settings, load_model, failed)
    server = uvicorn_server(app, host, port)
    print(f"santacpu serve: http://{host}:{port} (loading {settings.model_name}; /health says when it is ready)", flush=True)
    server.run()
    if failure:
        raise SantacpuError(failure[0])
    if not server.started:
        raise SantacpuError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
