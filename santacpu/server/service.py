"""What every dialect's routes share: the server's settings, its state (the model once loaded, the
one generation thread, the live requests by slot), working on a request's JSON body (only
`application/json`, bounded, parsed on a worker thread), submitting a `Job` to the worker, and
reading runs to their end while watching for a client that hangs up.

May import: starlette, `santacpu.model`, `santacpu.generation`, `santacpu.errors`, `santacpu.progress`,
the server's `requests`, `completion` and `worker`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import SantacpuError
from ..generation.batch import DEFAULT_MAX_BATCH, QueueFull
from ..model import Model
from ..progress import latest
from .completion import CompletionText
from .requests import MAX_BODY_BYTES, Job, RequestError, body_too_large, parse_body
from .worker import GenerationWorker, ShuttingDown

# The name every model list and response gives the model, whatever file serves: clients pick their
# prompt style by it (Continue writes chat-style prompts for names containing "gpt", as the hub's
# `bigcode/gpt_bigcode-santacoder` does).
SERVED_MODEL = "santacoder"
# On the exit signal a stream's generation is cancelled at its next step; it then sends its final
# chunk. A stream still open after this long is cut.
SHUTDOWN_GRACE_S = 5.0


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = 64
    # Suffix first: typing at the cursor only appends to the prompt (a keystroke computes ~1 token
    # where prefix-first recomputes the whole suffix: see docs/server.md's typing trace).
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
        self.body_bytes = 0  # bytes of request bodies held, see body_work (event loop only: no lock)
        self.load_waiters = 0  # requests waiting for the model to load (event loop only)
        self.text_slots = asyncio.Semaphore(TEXT_WORKERS)  # see body_work
        self.closing = False
        self.load_failed = False
        self.started = time.time()
        self.load_started = time.perf_counter()
        self.load_seconds = 0.0
        self._load_model = load_model
        self._on_load_failure = on_load_failure

    def start_loading(self) -> None:
        threading.Thread(target=self._load_in_background, name="santacpu-load", daemon=True).start()

    def load(self) -> None:
        """Load the model in this thread and serve with it; a failure is a SantacpuError."""
        self.load_started = time.perf_counter()
        try:
            model = self._load_model()
            model.warm_up()  # a first run's kernel compile, here and not in the first request
        except SantacpuError:
            self.load_failed = True
            raise
        except Exception as e:  # not a user's mistake, but the server must not wait forever at 503
            self.load_failed = True
            raise SantacpuError(f"the model failed to load: {type(e).__name__}: {e}") from e
        s = self.settings
        self.worker = GenerationWorker(model.scheduler(max_batch=s.max_batch, max_queue=s.max_queue))
        self.load_seconds = time.perf_counter() - self.load_started
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

    def ready_model(self) -> Model:
        if self.closing:
            raise RequestError("the server is shutting down", 503, "unavailable")
        if self.model is None:
            raise RequestError("the model is loading", 503, "unavailable")
        return self.model

    def max_completions(self) -> int:
        """The most completions (n, n_cmpl) one request may ask for."""
        return max(1, self.settings.max_batch // 2)

    async def loaded_model(self) -> Model:
        """The model, once it has loaded (Ollama's clients ask for a load and wait for it); at most
        MAX_LOAD_WAITERS requests wait, the others get 503 (2,000 waiting connections had held 320
        MB of bodies the server had not read yet)."""
        if self.model is None and self.load_waiters >= MAX_LOAD_WAITERS:
            raise RequestError(f"the model is loading, and {MAX_LOAD_WAITERS} requests wait for it already", 503,
                               "unavailable")
        self.load_waiters += 1
        try:
            while self.model is None and not self.closing and not self.load_failed:
                await asyncio.sleep(0.1)
        finally:
            self.load_waiters -= 1
        return self.ready_model()

    def submit(self, job: Job) -> list[CompletionText]:
        """Queue the job's sequences (a newer request of the same slot cancels the older one)."""
        model = self.ready_model()
        most = self.max_completions()
        if job.n > most:  # (16 samples of 2,000 tokens held every slot: a 4-token request waited 33 s)
            raise RequestError(f"{job.n} completions in one request: at most {most}, half of the server's batch "
                               f"(--max-batch {self.settings.max_batch}), so that one request leaves room for others")
        if job.id_slot is not None:  # a newer request of the same slot: the older one is not awaited
            for older in self.slots.pop(job.id_slot, []):
                older.cancel()
        try:
            feeds = self.worker.submit(job.ids, job.options, job.n)
        except (QueueFull, ShuttingDown) as e:
            raise RequestError(str(e), 503, "unavailable") from None
        except SantacpuError as e:
            raise RequestError(str(e)) from None
        if job.id_slot is not None:
            for ended in [slot for slot, older in self.slots.items() if all(f.sequence.done for f in older)]:
                del self.slots[ended]  # only live requests are remembered: a client cannot grow this
            self.slots[job.id_slot] = feeds
        submitted = time.perf_counter()
        return [CompletionText(feed, model.tokenizer, job, submitted) for feed in feeds]


# Bytes of request bodies the server holds at once, from their arrival until their text work is
# done (64 of the largest): counted in bytes, not requests, so that stalled uploads of a few bytes
# each cannot fill it (64 of them held every generating endpoint at 503), and kept until the work
# is done, so that bodies waiting for a text worker are counted too (60 clients grew it to 11 GB).
MAX_BODY_BUDGET = 64 * MAX_BODY_BYTES
# Requests that may wait for the model to load (Ollama's clients do); more get 503.
MAX_LOAD_WAITERS = 64
# Seconds a body may take to arrive (4 MiB, the most, at 1 MB/s: 4 s).
BODY_TIMEOUT_S = 15.0
# Text work (parsing a body, encoding a prompt, /tokenize) on worker threads at once: one can take
# ~100 MB for a context's worth of text (60 at once held 6 GB); the others wait their turn.
TEXT_WORKERS = 4


async def body_work(request: Request, function: Callable, *args):
    """function(body, *args) on a worker thread, at most TEXT_WORKERS at once server-wide, `body`
    the request's JSON object (only `application/json` is read), parsed in the same turn: a parsed
    body (up to ~8 times its bytes) never waits for a worker. The body's bytes count against
    MAX_BODY_BUDGET from their arrival until `function` returns; past the budget a request gets
    503. A client that hung up while its body waited for a worker is not worked for."""
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
    state = request.app.state.santacpu
    chunks: list[bytes] = []
    held = 0

    async def receive() -> None:
        nonlocal held
        async for chunk in request.stream():  # read no further than the limit, whatever the header said
            if held + len(chunk) > MAX_BODY_BYTES:
                raise body_too_large()
            if state.body_bytes + len(chunk) > MAX_BODY_BUDGET:
                raise RequestError(f"the server holds {MAX_BODY_BUDGET >> 20} MiB of request bodies already; try "
                                   "again shortly", 503, "unavailable")
            state.body_bytes += len(chunk)
            held += len(chunk)
            chunks.append(chunk)

    try:
        try:
            await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", 408, "timeout") from None
        raw = b"".join(chunks)
        chunks.clear()
        async with state.text_slots:
            if await request.is_disconnected():
                raise RequestError("the client hung up before its request was worked on")
            return await run_in_threadpool(_parsed_then, raw, function, *args)
    finally:
        state.body_bytes -= held


def _parsed_then(raw: bytes, function: Callable, *args):
    return function(parse_body(raw), *args)


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
            # Its outcome is nobody's now: retrieved, or asyncio logs a traceback per hang-up.
            work.add_done_callback(lambda ended: ended.cancelled() or ended.exception())
            for run in runs:
                run.feed.cancel()
            break
    if work.done() and not work.cancelled():
        work.result()


def finish_reason(run: CompletionText) -> str:
    """OpenAI's and Ollama's name for how a run ended."""
    return "length" if run.stop_type == "limit" else "stop"
