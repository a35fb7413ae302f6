"""The HTTP layer of `santacpu serve` (Starlette; SSE through sse-starlette): routes, the API key,
error bodies, and the JSON shapes of llama.cpp's server and OpenAI's completions API. Everything
below the routes is the library's: request checking (`requests`), the generation thread (`worker`),
text and stop rules (`completion`).

Every refusal is a 4xx with `{"error": {"code", "message", "type"}}`; a full queue is a 503 with
`Retry-After`. While the model loads, `/health` answers 503 `{"status": "loading"}` with the
loading's progress where it reports one (a first-use quantization).

Not a browser's to reach: a request body must be `application/json` (a web page cannot send that
cross-origin without a CORS preflight, which is never granted), and the Host header must name the
bound address or localhost unless the server listens on every address (DNS rebinding).

The event loop only routes: request bodies are parsed and turned into jobs (tokenizing, which
releases the GIL) on worker threads.

May import: starlette, sse_starlette, `santacpu.model`, `santacpu.generation`, `santacpu.errors`,
the server's other modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import SantacpuError
from ..generation.batch import DEFAULT_MAX_BATCH, QueueFull
from ..model import Model
from ..progress import latest
from .completion import CompletionText
from .requests import (
    MAX_BODY_BYTES,
    Job,
    RequestError,
    body_too_large,
    check_text_size,
    completion_job,
    infill_job,
    openai_job,
    parse_body,
    text_limit,
)
from .worker import GenerationWorker, ShuttingDown

RETRY_AFTER_S = 2
# On the exit signal a stream's generation is cancelled at its next step; it then sends its final
# chunk. sse-starlette cuts a stream still open after this long.
SHUTDOWN_GRACE_S = 5.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::", "")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = 64
    # Suffix first: typing at the cursor only appends to the prompt (a keystroke computes ~1 token
    # where prefix-first recomputes the whole suffix: see the README's typing trace).
    fim_order: str = "spm"
    fim_budget: int | None = None  # most prompt tokens of a FIM request (None: the context's)
    host: str = "127.0.0.1"  # the address listened on: Host headers must name it or localhost


class ServerState:
    """The model (None while loading), its generation thread, and the requests by slot."""

    def __init__(self, settings: ServerSettings, load_model: Callable[[], Model], on_load_failure: Callable[[str], None]):
        self.settings = settings
        self.model: Model | None = None
        self.worker: GenerationWorker | None = None
        self.slots: dict[int, list] = {}  # id_slot -> the feeds of its latest request
        self.closing = False
        self.load_started = time.perf_counter()
        self._load_model = load_model
        self._on_load_failure = on_load_failure

    def start_loading(self) -> None:
        threading.Thread(target=self._load_in_background, name="santacpu-load", daemon=True).start()

    def load(self) -> None:
        """Load the model in this thread and serve with it; a failure is a SantacpuError."""
        self.load_started = time.perf_counter()
        try:
            model = self._load_model()
        except SantacpuError:
            raise
        except Exception as e:  # not a user's mistake, but the server must not wait forever at 503
            raise SantacpuError(f"the model failed to load: {type(e).__name__}: {e}") from e
        s = self.settings
        self.worker = GenerationWorker(model.scheduler(max_batch=s.max_batch, max_queue=s.max_queue))
        self.model = model

    def _load_in_background(self) -> None:
        try:
            self.load()
        except SantacpuError as e:
            self._on_load_failure(str(e))

    def loading_progress(self) -> dict | None:
        return latest(self.load_started)

    def begin_shutdown(self) -> None:
        """The exit signal: every in-flight request ends now with what it has (stop_type "limit",
        a stream with its final chunk); new ones get 503."""
        self.closing = True
        if self.worker is not None:
            self.worker.close()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # always writable as UTF-8
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status, headers=headers)


async def read_body(request: Request) -> dict:
    """The request's JSON object, parsed on a worker thread; only `application/json` is read."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError(
            f"send the body as JSON with 'Content-Type: application/json' (got '{media_type or 'none'}')",
            415,
            "unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise body_too_large()
    chunks, size = [], 0
    async for chunk in request.stream():  # read no further than the limit, whatever the header said
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise body_too_large()
        chunks.append(chunk)
    return await run_in_threadpool(parse_body, b"".join(chunks))


def create_app(
    settings: ServerSettings,
    load_model: Callable[[], Model],
    on_load_failure: Callable[[str], None],
    load_in_background: bool = True,
) -> Starlette:
    """The app; it loads the model itself when it starts unless `load_in_background` is False (then
    the caller runs `app.state.santacpu.load()`)."""
    state = ServerState(settings, load_model, on_load_failure)

    def ready_model() -> Model:
        if state.closing:
            raise RequestError("the server is shutting down", 503, "unavailable")
        if state.model is None:
            raise RequestError("the model is loading", 503, "unavailable")
        return state.model

    def submit(job: Job) -> list[CompletionText]:
        model = ready_model()
        if job.id_slot is not None:  # a newer request of the same slot: the older one is not awaited
            for older in state.slots.pop(job.id_slot, []):
                older.cancel()
        try:
            feeds = state.worker.submit(job.ids, job.options, job.n)
        except (QueueFull, ShuttingDown) as e:
            raise RequestError(str(e), 503, "unavailable") from None
        except SantacpuError as e:
            raise RequestError(str(e)) from None
        if job.id_slot is not None:
            for ended in [slot for slot, older in state.slots.items() if all(f.sequence.done for f in older)]:
                del state.slots[ended]  # only live requests are remembered: a client cannot grow this
            state.slots[job.id_slot] = feeds
        submitted = time.perf_counter()
        return [CompletionText(feed, model.tokenizer, job, submitted) for feed in feeds]

    async def health(request: Request) -> JSONResponse:
        if state.model is None:
            progress = state.loading_progress()
            return JSONResponse({"status": "loading", **({"progress": progress} if progress else {})}, 503)
        return JSONResponse({"status": "ok"})

    async def llama_completion(request: Request, build) -> object:
        model = ready_model()
        body = await read_body(request)
        job = await run_in_threadpool(build, body, model)
        runs = submit(job)
        run = runs[0]
        if len(runs) > 1:  # n_cmpl (llama.vscode): one result object per completion, in a list
            await collect(runs, request)
            return JSONResponse([llama_result(job, r) for r in runs])
        if job.stream:
            async def events():
                async for piece in run.pieces():
                    yield {"data": json.dumps({"content": piece, "stop": False, "id_slot": job.id_slot or 0})}
                yield {"data": json.dumps(llama_result(job, run))}

            return EventSourceResponse(events(), ping=15, shutdown_grace_period=SHUTDOWN_GRACE_S)
        await collect([run], request)
        return JSONResponse(llama_result(job, run))

    def llama_result(job: Job, run: CompletionText) -> dict:
        text = run.text()
        result = {
            "content": text,
            "id_slot": job.id_slot or 0,
            "stop": True,
            "model": settings.model_name,
            "tokens_predicted": len(run.sequence.tokens),
            "tokens_evaluated": len(job.ids),
            "tokens_cached": run.sequence.stats.reused_tokens,
            "truncated": job.truncated,
            "stop_type": run.stop_type,
            "stopping_word": run.stopping_word,
            "has_new_line": "\n" in text,
            "timings": run.timings(),
        }
        return pick_fields(result, job.response_fields) if job.response_fields else result

    async def completion(request: Request):
        return await llama_completion(request, lambda body, m: completion_job(body, m.tokenizer, m.config.n_positions))

    async def infill(request: Request):
        return await llama_completion(
            request,
            lambda body, m: infill_job(body, m.tokenizer, m.config.n_positions, settings.fim_order, settings.fim_budget),
        )

    async def openai_completions(request: Request):
        model = ready_model()
        job = await run_in_threadpool(
            openai_job, await read_body(request), model.tokenizer, model.config.n_positions, settings.fim_order, settings.fim_budget
        )
        runs = submit(job)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str, finish: str | None) -> str:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return json.dumps(
                {"id": ident, "object": "text_completion", "created": created, "model": settings.model_name, "choices": [choice]}
            )

        if job.stream:
            async def events():
                merged: asyncio.Queue = asyncio.Queue()

                async def pump(index: int, run: CompletionText) -> None:
                    try:
                        async for piece in run.pieces():
                            await merged.put(chunk(index, piece, None))
                        await merged.put(chunk(index, "", finish_reason(run)))
                    finally:
                        await merged.put(None)

                tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
                try:
                    open_runs = len(tasks)
                    while open_runs:
                        item = await merged.get()
                        if item is None:
                            open_runs -= 1
                        else:
                            yield {"data": item}
                    yield {"data": "[DONE]"}
                finally:
                    for task in tasks:
                        task.cancel()

            return EventSourceResponse(events(), ping=15, shutdown_grace_period=SHUTDOWN_GRACE_S)
        await collect(runs, request)
        completion_tokens = sum(len(run.sequence.tokens) for run in runs)
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": settings.model_name,
                "choices": [
                    {"text": run.text(), "index": i, "logprobs": None, "finish_reason": finish_reason(run)}
                    for i, run in enumerate(runs)
                ],
                "usage": {
                    "prompt_tokens": len(job.ids),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(job.ids) + completion_tokens,
                },
            }
        )

    async def tokenize(request: Request) -> JSONResponse:
        model = ready_model()
        body = await read_body(request)
        content = body.get("content")
        if not isinstance(content, str) or set(body) - {"content", "add_special", "with_pieces"}:
            raise RequestError("/tokenize takes {'content': string}")
        check_text_size(content, "'content'", text_limit(model.tokenizer, model.config.n_positions))
        return JSONResponse({"tokens": await run_in_threadpool(model.tokenizer.encode, content)})

    async def detokenize(request: Request) -> JSONResponse:
        model = ready_model()
        body = await read_body(request)
        tokens = body.get("tokens")
        vocab = model.tokenizer.vocab_size
        if (
            set(body) - {"tokens"}
            or not isinstance(tokens, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)
        ):
            raise RequestError(f"/detokenize takes {{'tokens': [token ids in 0..{vocab - 1}]}}")
        return JSONResponse({"content": await run_in_threadpool(model.tokenizer.decode, tokens)})

    async def props(request: Request) -> JSONResponse:
        model = ready_model()
        return JSONResponse(
            {
                "default_generation_settings": {"n_ctx": model.config.n_positions, "model": settings.model_name},
                "total_slots": settings.max_batch,
                "model_path": settings.model_name,
                "fim_order": settings.fim_order,
            }
        )

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "santacpu", "created": 0}]}
        )

    async def refuse(request: Request, error: Exception):
        if isinstance(error, RequestError):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
            return error_response(error.status, str(error), error.kind, headers)
        from starlette.exceptions import HTTPException

        if isinstance(error, HTTPException):
            return error_response(error.status_code, str(error.detail), "invalid_request_error")
        print(f"santacpu serve: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return error_response(500, "internal error (the server logged it)", "server_error")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/completion", completion, methods=["POST"]),
        Route("/completions", completion, methods=["POST"]),
        Route("/infill", infill, methods=["POST"]),
        Route("/v1/completions", openai_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/props", props, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_in_background:
            state.start_loading()
        yield
        state.stop()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: refuse, RequestError: refuse, 404: refuse, 405: refuse},
    )
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
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ApiKey:
    """Every path but /health requires `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def finish_reason(run: CompletionText) -> str:
    return "length" if run.stop_type == "limit" else "stop"


def pick_fields(result: dict, paths: list[str]) -> dict:
    """llama.cpp's `response_fields`: only these (slash-separated) paths, each under its own name."""
    picked = {}
    for path in paths:
        value = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            if path:
                picked[path] = value
    return picked


async def collect(runs: list[CompletionText], request: Request) -> None:
    """Read every run to its end; a client that hangs up meanwhile cancels them all."""

    async def drain(run: CompletionText) -> None:
        async for _ in run.pieces():
            pass

    work = asyncio.gather(*(drain(run) for run in runs))
    while not work.done():
        done, _ = await asyncio.wait({work}, timeout=0.2)
        if not done and await request.is_disconnected():
            work.cancel()
            for run in runs:
                run.feed.cancel()
            break
    if work.done() and not work.cancelled():
        work.result()
