"""OpenAI's completions dialect: `POST /v1/completions` (`suffix`, or a prompt written in any
client's FIM template, fills in the middle) with its field names read into a `Job`, its response
shapes (a `text_completion` object; server-sent event chunks, then `data: [DONE]`), and the model
list (`/v1/models`).

May import: starlette, sse_starlette, `santacpu.generation`, `santacpu.errors`, `santacpu.tokenizer`,
the server's `requests`, `service` and `completion`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..tokenizer import Tokenizer
from .completion import CompletionText
from .requests import MAX_SAMPLES, Fields, Job, RequestError, encode_prompt, generation_options, make_job, text_prompt_job
from .service import SERVED_MODEL, SHUTDOWN_GRACE_S, ServerState, body_work, collect, finish_reason

OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16}

_OPENAI_FIELDS = {
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "user",
    "logprobs", "echo", "presence_penalty", "frequency_penalty", "best_of", "stream_options", "logit_bias",
}


def openai_job(body: dict, tokenizer: Tokenizer, n_ctx: int, order: str, budget: int | None = None) -> Job:
    """OpenAI's `POST /v1/completions`; `suffix` (or a prompt written in a client's FIM template)
    fills in the middle."""
    f = Fields(body, _OPENAI_FIELDS)
    # Each accepted at its neutral value only, of its own type: `best_of: true` is not 1, `echo: 0`
    # is not false (Python's True == 1 and 0 == False had let them through).
    for unsupported, neutral in (("logprobs", None), ("echo", False), ("best_of", 1), ("logit_bias", {})):
        value = body.get(unsupported)
        if value is not None and not (type(value) is type(neutral) and value == neutral):
            raise RequestError(f"'{unsupported}' is not supported by santacpu")
    f.number("presence_penalty", 0.0, 0.0, 0.0)
    f.number("frequency_penalty", 0.0, 0.0, 0.0)
    f.text("user")
    f.text("model")
    stream_options = Fields(f.get("stream_options", (dict,), {}, "an object"), {"include_usage"})
    include_usage = stream_options.flag("include_usage", False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    token_ids = isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                   for t in prompt)
    if not isinstance(prompt, str) and not token_ids:
        raise RequestError("'prompt' must be a string or a list of token ids")
    max_tokens = f.integer("max_tokens", OPENAI_DEFAULTS["max_tokens"], 0, n_ctx)
    seed = f.integer("seed", None, 0, (1 << 63) - 1)
    options = generation_options(
        max_new_tokens=max_tokens,
        temperature=f.number("temperature", OPENAI_DEFAULTS["temperature"], 0.0, 2.0),
        top_p=f.number("top_p", OPENAI_DEFAULTS["top_p"], 1e-9, 1.0),
        seed=seed,
        stop=f.stop_strings("stop"),
    )
    extras = {"stream": f.flag("stream", False), "include_usage": include_usage}
    n = f.integer("n", 1, 1, MAX_SAMPLES)
    suffix = f.text("suffix", None)
    if token_ids:
        if suffix is not None:
            raise RequestError("'suffix' needs a text prompt, not token ids")
        job = make_job(encode_prompt(tokenizer, prompt, n_ctx), options, extras, truncated=False)
    else:
        job = text_prompt_job(tokenizer, prompt, suffix, options, extras, n_ctx, order, budget)
    job.n = n
    return job


def routes(state: ServerState) -> list[Route]:
    """OpenAI's endpoints over the shared state."""
    settings = state.settings

    async def completions(request: Request):
        model = state.ready_model()
        job = await body_work(
            request, openai_job, model.tokenizer, model.config.n_positions, settings.fim_order, settings.fim_budget
        )
        runs = state.submit(job)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str, finish: str | None) -> str:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return json.dumps(
                {"id": ident, "object": "text_completion", "created": created, "model": SERVED_MODEL, "choices": [choice]}
            )

        def usage() -> dict:
            completion_tokens = sum(run.predicted for run in runs)
            return {"prompt_tokens": len(job.ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(job.ids) + completion_tokens}

        def usage_chunk() -> str:  # (stream_options.include_usage: OpenAI's last chunk, before [DONE])
            return json.dumps({"id": ident, "object": "text_completion", "created": created, "model": SERVED_MODEL,
                               "choices": [], "usage": usage()})

        if job.stream:
            last = usage_chunk if job.include_usage else None
            return EventSourceResponse(merged_events(runs, chunk, last), ping=15, shutdown_grace_period=SHUTDOWN_GRACE_S)
        await collect(runs, request)
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": SERVED_MODEL,
                "choices": [
                    {"text": run.text(), "index": i, "logprobs": None, "finish_reason": finish_reason(run)}
                    for i, run in enumerate(runs)
                ],
                "usage": usage(),
            }
        )

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model", "owned_by": "santacpu", "created": 0}]}
        )

    return [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
    ]


async def merged_events(runs: list[CompletionText], chunk, last=None):
    """The runs' pieces as SSE events, interleaved as they come, each run's last with its finish
    reason, then `last()`'s event if given, then `[DONE]`."""
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
        if last is not None:
            yield {"data": last()}
        yield {"data": "[DONE]"}
    finally:
        for task in tasks:
            task.cancel()
