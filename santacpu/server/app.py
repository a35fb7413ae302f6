"""The HTTP app of `santacpu serve` (Starlette): the list of routes, one module per dialect over the
shared state (`service`): llama.cpp's (`llama_api`), OpenAI's (`openai_api`), Ollama's
(`ollama_api`); the API key; the Host check; and error bodies in each dialect's shape.

Every refusal is a 4xx: `{"error": {"code", "message", "type"}}` (llama.cpp's and OpenAI's), or
`{"error": "message"}` under `/api/` (Ollama's); a full queue is a 503 with `Retry-After`. While
the model loads, `/health` answers 503 `{"status": "loading"}` with the loading's progress where it
reports one (a first-use quantization).

Not a browser's to reach: a request body must be `application/json` (a web page cannot send that
cross-origin without a CORS preflight, which is never granted), and the Host header must name the
bound address or localhost unless the server listens on every address (DNS rebinding).

The event loop only routes: request bodies are parsed and turned into jobs (tokenizing, which
releases the GIL) on worker threads.

May import: starlette, `santacpu.model`, the server's other modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
import urllib.parse
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..model import Model
from . import llama_api, ollama_api, openai_api
from .connections import quiet_accept_errors
from .requests import RequestError
from .service import ServerSettings, ServerState

__all__ = ["ServerSettings", "ServerState", "create_app"]

RETRY_AFTER_S = 2
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::", "")
OLLAMA_PATHS = "/api/"  # Ollama's dialect: its error shape


def error_response(status: int, message: str, kind: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    """A refusal in the shape of the dialect `path` belongs to."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # always writable as UTF-8
    if path.startswith(OLLAMA_PATHS):
        return JSONResponse({"error": message}, status, headers=headers)
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status, headers=headers)


def create_app(
    settings: ServerSettings,
    load_model: Callable[[], Model],
    on_load_failure: Callable[[str], None],
    load_in_background: bool = True,
) -> Starlette:
    """The app; it loads the model itself when it starts unless `load_in_background` is False (then
    the caller runs `app.state.santacpu.load()`)."""
    state = ServerState(settings, load_model, on_load_failure)
    routes = [*llama_api.routes(state), *openai_api.routes(state), *ollama_api.routes(state)]

    async def refuse(request: Request, error: Exception):
        path = request.url.path
        if isinstance(error, RequestError):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
            return error_response(error.status, str(error), error.kind, headers, path)
        from starlette.exceptions import HTTPException

        if isinstance(error, HTTPException):
            return error_response(error.status_code, str(error.detail), "invalid_request_error", path=path)
        print(f"santacpu serve: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return error_response(500, "internal error (the server logged it)", "server_error", path=path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        quiet_accept_errors(asyncio.get_running_loop())
        if load_in_background:
            state.start_loading()
        yield
        state.stop()

    async def client_gone(request: Request, error: Exception):
        # A client that hung up mid-body (reading it raised): nobody reads the answer, and it is
        # no server error, so nothing is logged but the access line (a class's own handler,
        # unlike Exception's, does not re-raise into the server's log).
        return error_response(400, "the client closed the connection before its request's end", "client_closed")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: refuse, RequestError: refuse, ClientDisconnect: client_gone, 404: refuse,
                            405: refuse},
    )
    app.router.redirect_slashes = False  # "/completion/": a JSON 404, not an empty 307
    app.state.santacpu = state
    if settings.api_key:
        app.add_middleware(_ApiKey, key=settings.api_key)
    hosts = allowed_hosts(settings.host)
    if hosts is not None:
        app.add_middleware(_KnownHost, hosts=hosts)  # added last: checked first
    return app


def allowed_hosts(bound: str) -> frozenset[str] | None:
    """The host names a server listening on `bound` answers to: that address and localhost's
    names; None (any) where it listens on every address, which opened it to other names anyway."""
    if bound in EVERY_ADDRESS:
        return None
    return frozenset({bound.strip("[]").lower(), *LOOPBACK_NAMES})


class _KnownHost:
    """Refuses a request whose Host header names another host: a web page on a rebound DNS name
    must not reach a local server. (Starlette's TrustedHostMiddleware answers in plain text and
    reads "[::1]:8012" as "[": this answers in the server's JSON error shape.)"""

    def __init__(self, app, hosts: frozenset[str]):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            try:
                name = urllib.parse.urlsplit(f"//{host}").hostname or ""
            except ValueError:  # a malformed "[..." address
                name = ""
            if name not in self.hosts:
                shown = ", ".join(sorted(self.hosts))
                response = error_response(
                    400,
                    f"Host '{host}' is not served here (only {shown}; serve --host 0.0.0.0 answers every name)",
                    "invalid_request_error",
                    path=scope["path"],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ApiKey:
    """Every path but /health requires `Authorization: Bearer KEY` (the scheme's name in any case,
    as HTTP has it) or, as llama.cpp's server also takes, `X-Api-Key: KEY`; compared in constant
    time."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer":
                given = headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error", path=scope["path"]
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
