"""Ollama's dialect, the parts code assistants use (Continue's `ollama` provider, twinny, Tabby's
`ollama/completion`, the `ollama` Python client): `POST /api/generate` (a `prompt`, with `suffix`
for fill in the middle, or written in a client's FIM template with `raw`), streamed as NDJSON by
default; `POST /api/show` (a template with `{{ .Prompt }}` and `{{ .Suffix }}`: clients enable
FIM by it), `GET /api/tags`, `GET /api/ps`, `GET /api/version`, and `GET /` ("Ollama is running").

As Ollama does, unknown top-level fields and unknown `options` keys are ignored, a known one of
the wrong type is a 400, a request while the model loads waits for it, and an empty prompt only
loads the model (`done_reason` "load"). Errors
are Ollama's `{"error": "message"}` (the app shapes them by path).

May import: starlette, `santacpu.model`, `santacpu.generation`, `santacpu.errors`, `santacpu.tokenizer`,
`santacpu.config` and `santacpu.network.weights` (the served model's size and type), the server's `requests`, `service` and `completion`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..config import Config
from ..generation.options import GenerationOptions
from ..model import Model
from ..network.weights import LINEAR_WEIGHTS, ModelWeights, expected_layer_shapes
from ..tokenizer import Tokenizer
from .completion import CompletionText
from .requests import Fields, Job, RequestError, generation_options, text_prompt_job
from .service import SERVED_MODEL, ServerState, body_work, collect, finish_reason

# Ollama's sampling defaults; num_predict -1: until the context is full.
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "num_predict": -1}
# The API version whose shapes these follow (clients compare it against the features they need).
OLLAMA_VERSION = "0.12.0"
# What /api/show gives as the model's template: FIM when a suffix is given, else the prompt as is.
TEMPLATE = "{{- if .Suffix }}<fim-prefix>{{ .Prompt }}<fim-suffix>{{ .Suffix }}<fim-middle>{{- else }}{{ .Prompt }}{{- end }}"
NDJSON = "application/x-ndjson"


def options_of(body: dict, n_ctx: int) -> GenerationOptions:
    """`options` (an object; its keys santacpu has no use for are ignored) as GenerationOptions."""
    raw = body.get("options")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError(f"'options' must be an object, got {type(raw).__name__}")
    f = Fields(raw, set(raw))
    num_predict = f.integer("num_predict", OLLAMA_DEFAULTS["num_predict"], -2, 1 << 20)
    seed = f.integer("seed", -1, -(1 << 63), (1 << 63) - 1)
    top_p = f.number("top_p", OLLAMA_DEFAULTS["top_p"], 0.0, 1.0)
    return generation_options(
        max_new_tokens=n_ctx if num_predict < 0 else num_predict,  # -1, -2: until the context is full
        temperature=f.number("temperature", OLLAMA_DEFAULTS["temperature"], 0.0, 100.0),
        top_k=f.integer("top_k", OLLAMA_DEFAULTS["top_k"], 0, 1 << 20),
        top_p=top_p if top_p > 0 else 1.0,
        seed=None if seed < 0 else seed,
        stop=f.stop_strings("stop"),
    )


def generate_fields(body: dict) -> tuple[Fields, str, str | None, bool]:
    """The top-level fields santacpu reads: (fields, prompt, suffix or None, stream); `model` is
    required; images, `context` and `format` are refused; other fields are ignored."""
    f = Fields(body, set(body))
    if not f.text("model", ""):
        raise RequestError("model is required")
    prompt = f.text("prompt", "")
    suffix = f.text("suffix", "") or None  # Ollama: an empty suffix is no suffix
    f.flag("raw", False)
    f.text("system", "")
    f.text("template", "")
    if f.get("images", (list,), [], "a list") or f.get("context", (list,), [], "a list"):
        raise RequestError("'images' and 'context' are not supported by santacpu")
    if f.get("format", (str, dict), "", "a string or an object"):
        raise RequestError("'format' (structured output) is not supported by santacpu")
    return f, prompt, suffix, f.flag("stream", True)


def generate_request(
    body: dict, tokenizer: Tokenizer, n_ctx: int, order: str, budget: int | None
) -> tuple[bool, str | None, Job | None]:
    """Ollama's `POST /api/generate`: (stream, "load" or "unload" for a request without a prompt,
    else None; the job of one with a prompt, FIM with a suffix or a client's FIM template, else None)."""
    _, prompt, suffix, stream = generate_fields(body)
    if not prompt and suffix is None:  # a load (or, keep_alive 0, an unload) request
        return stream, "unload" if body.get("keep_alive") in (0, "0", "0s") else "load", None
    job = text_prompt_job(tokenizer, prompt, suffix, options_of(body, n_ctx), {"stream": stream}, n_ctx, order, budget)
    return stream, None, job


def show_fields(body: dict) -> None:
    """/api/show's body checked: `model` (or `name`) is required."""
    f = Fields(body, set(body))
    if not (f.text("model", "") or f.text("name", "")):
        raise RequestError("model is required")
    f.flag("verbose", False)


def now() -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def parameter_count(config: Config) -> int:
    """Every weight of a model of this shape (SantaCoder: 1,124,886,528, its padded vocabulary included)."""
    per_layer = sum(math.prod(shape) for shape in expected_layer_shapes(config).values())
    return (config.vocab_size + config.n_positions) * config.n_embd + config.n_layer * per_layer + 2 * config.n_embd


def quantization_level(weights: ModelWeights) -> str:
    """The storage type of most of the layers' matrix weights, as Ollama writes levels: Q8_0, Q4_M, F16, F32."""
    held: Counter = Counter()
    for layer in weights.layers:
        for name in LINEAR_WEIGHTS:
            weight = getattr(layer, name)
            held[getattr(weight, "qtype", None) or weight.dtype.name] += math.prod(weight.shape)
    kind = held.most_common(1)[0][0]
    return {"float32": "F32", "float16": "F16"}.get(kind, kind.upper())


def details_of(model: Model | None) -> dict:
    """/api/show's, /api/tags' and /api/ps' `details` (the size and level empty while the model loads)."""
    count = parameter_count(model.config) if model is not None else 0
    size = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count else ""
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": "gpt_bigcode",
        "families": ["gpt_bigcode"],
        "parameter_size": size,
        "quantization_level": quantization_level(model.weights) if model is not None else "",
    }


def routes(state: ServerState) -> list[Route]:
    """Ollama's endpoints over the shared state."""
    settings = state.settings
    digest = hashlib.sha256(settings.model_name.encode()).hexdigest()

    def modified_at() -> str:
        return datetime.fromtimestamp(state.started, timezone.utc).isoformat().replace("+00:00", "Z")

    def final(run: CompletionText | None, job: Job | None, reason: str, text: str = "") -> dict:
        answer = {"model": SERVED_MODEL, "created_at": now(), "response": text, "done": True, "done_reason": reason}
        if run is not None and job is not None:
            t = run.timings()
            ended = run.ended_at or time.perf_counter()
            answer |= {
                "total_duration": int((ended - run.submitted) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": t["prompt_n"],  # computed, as Ollama counts: a reused prompt prefix is not
                "prompt_eval_duration": int(t["prompt_ms"] * 1e6),
                "eval_count": run.predicted,
                "eval_duration": int(t["predicted_ms"] * 1e6),
            }
        return answer

    async def generate(request: Request):
        model = await state.loaded_model()  # as Ollama: a request while the model loads waits for it
        stream, load_reason, job = await body_work(
            request, generate_request, model.tokenizer, model.config.n_positions, settings.fim_order, settings.fim_budget
        )
        if job is None:
            answer = final(None, None, load_reason) | {"load_duration": int(state.load_seconds * 1e9)}
            return StreamingResponse(iter([json.dumps(answer) + "\n"]), media_type=NDJSON) if stream else JSONResponse(answer)
        run = state.submit(job)[0]
        if stream:
            async def lines():
                async for piece in run.pieces():
                    yield json.dumps({"model": SERVED_MODEL, "created_at": now(), "response": piece, "done": False}) + "\n"
                yield json.dumps(final(run, job, finish_reason(run))) + "\n"

            return StreamingResponse(lines(), media_type=NDJSON)
        await collect([run], request)
        return JSONResponse(final(run, job, finish_reason(run), run.text()))

    async def show(request: Request) -> JSONResponse:
        await body_work(request, show_fields)
        model = state.model
        info: dict = {"general.architecture": "gpt_bigcode"}
        if model is not None:
            info["general.parameter_count"] = parameter_count(model.config)
            info["gpt_bigcode.context_length"] = model.config.n_positions
        return JSONResponse(
            {
                "license": "BigCode OpenRAIL-M",
                "modelfile": f"# served by santacpu from {settings.model_name}\nFROM {settings.model_name}\nTEMPLATE \"\"\"{TEMPLATE}\"\"\"\n",
                "parameters": "\n".join(f"{k} {v}" for k, v in OLLAMA_DEFAULTS.items() if k != "num_predict")
                + '\nstop "<|endoftext|>"',
                "template": TEMPLATE,
                "details": details_of(model),
                "model_info": info,
                "capabilities": ["completion", "insert"],
                "modified_at": modified_at(),
            }
        )

    def listed(extra: dict) -> dict:
        return {"name": SERVED_MODEL, "model": SERVED_MODEL, "digest": digest, "size": 0, "details": details_of(state.model),
                **extra}

    async def tags(request: Request) -> JSONResponse:
        return JSONResponse({"models": [listed({"modified_at": modified_at()})]})

    async def ps(request: Request) -> JSONResponse:
        if state.model is None:
            return JSONResponse({"models": []})
        expires = (datetime.now(timezone.utc) + timedelta(days=3650)).isoformat().replace("+00:00", "Z")
        return JSONResponse(
            {"models": [listed({"expires_at": expires, "size_vram": 0, "context_length": state.model.config.n_positions})]}
        )

    async def version(request: Request) -> JSONResponse:
        return JSONResponse({"version": OLLAMA_VERSION})

    async def running(request: Request) -> PlainTextResponse:
        return PlainTextResponse("Ollama is running")

    return [
        Route("/", running, methods=["GET", "HEAD"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
    ]
