"""llama.cpp's server dialect, as llama.vim and llama.vscode speak it: `/infill` (fill in the
middle, with repository context `input_extra`), `/completion`, `/tokenize`, `/detokenize`,
`/props`, `/health`; their field names read into a `Job`, and their response shapes (a result
object; server-sent events whose last chunk is the full result).

Repository context (`/infill`'s `input_extra`, a list of `{filename, text}`): SantaCoder has no
file-separator token, so each chunk goes before the prefix as a comment line naming its file,
`# {filename}`, then its text: Python's own way of saying where code comes from, which the model
knows from its training data. At most `MAX_EXTRA_CHUNKS` chunks.

May import: starlette, sse_starlette, `santacpu.model`, `santacpu.generation`, `santacpu.errors`,
the server's `requests`, `service` and `completion`.
"""

from __future__ import annotations

import json

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..generation.options import GenerationOptions
from ..tokenizer import Tokenizer
from .completion import CompletionText
from .requests import (
    MAX_SAMPLES,
    Fields,
    Job,
    RequestError,
    check_text_size,
    encode_prompt,
    fim_job,
    generation_options,
    make_job,
    text_limit,
    text_prompt_job,
)
from .service import SERVED_MODEL, SHUTDOWN_GRACE_S, ServerState, body_work, collect

# llama.cpp's sampling defaults (its /completion and /infill).
LLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
MAX_EXTRA_CHUNKS = 256  # llama.vim and llama.vscode keep 16 by default
MAX_SAMPLER_LETTERS = 64

_LLAMA_COMMON = {
    "n_predict", "temperature", "top_k", "top_p", "seed", "stop", "stream", "cache_prompt", "samplers",
    "response_fields", "id_slot", "n_indent", "t_max_prompt_ms", "t_max_predict_ms", "model", "n_probs",
    "n_cmpl", "lora",
}


# llama.cpp's samplers by letter (common_sampler_type_to_chr): `"samplers": "kpt"` is its
# --sampling-seq form of ["top_k", "top_p", "temperature"].
SAMPLER_LETTERS = {"d": "dry", "k": "top_k", "y": "typical_p", "p": "top_p", "s": "top_n_sigma", "m": "min_p",
                   "t": "temperature", "x": "xtc", "i": "infill", "e": "penalties", "a": "adaptive_p"}


def _samplers(f: Fields) -> list[str] | None:
    """The sampler chain's names, from a list of names or a string of llama.cpp's letters (a
    letter it does not know is left out, as llama.cpp leaves it); None when not given."""
    given = f.body.get("samplers")
    if given is None:
        return None
    if isinstance(given, str):
        if len(given) > MAX_SAMPLER_LETTERS:
            raise RequestError(f"'samplers' takes at most {MAX_SAMPLER_LETTERS} letters, got {len(given)}")
        return [SAMPLER_LETTERS[c] for c in given if c in SAMPLER_LETTERS]
    return f.strings("samplers")


def _llama_options(f: Fields, n_ctx: int) -> tuple[GenerationOptions, dict]:
    n_predict = f.integer("n_predict", -1, -1, 1 << 20)
    temperature = f.number("temperature", LLAMA_DEFAULTS["temperature"], 0.0, 100.0)
    top_k = f.integer("top_k", LLAMA_DEFAULTS["top_k"], 0, 1 << 20)
    top_p = f.number("top_p", LLAMA_DEFAULTS["top_p"], 0.0, 1.0)
    samplers = _samplers(f)
    if samplers is not None:  # llama.cpp's chain: a sampler left out does not apply
        top_k = top_k if "top_k" in samplers else 0
        top_p = top_p if "top_p" in samplers else 1.0
        temperature = temperature if "temperature" in samplers else (1.0 if samplers else 0.0)
    seed = f.integer("seed", -1, -1, (1 << 63) - 1)
    options = generation_options(
        max_new_tokens=n_ctx if n_predict == -1 else n_predict,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p if top_p > 0 else 1.0,
        seed=None if seed == -1 else seed,
        stop=f.stop_strings("stop"),
    )
    f.get("cache_prompt", (bool,), True, "true or false")
    f.get("model", (str,), "", "a string")
    if f.integer("n_probs", 0, 0, 1 << 20):
        raise RequestError("token probabilities ('n_probs') are not supported by santacpu")
    f.number("t_max_prompt_ms", 0, -1, 1e9)
    if f.body.get("lora"):
        raise RequestError("LoRA adapters ('lora') are not supported by santacpu")
    extras = {
        "n": f.integer("n_cmpl", 1, 1, MAX_SAMPLES),
        "stream": f.flag("stream", False),
        "n_indent": f.integer("n_indent", 0, 0, 1 << 16),
        "t_max_predict_ms": max(0.0, f.number("t_max_predict_ms", 0, -1, 1e9)),
        "id_slot": f.integer("id_slot", -1, -1, 1 << 20),
        "response_fields": f.strings("response_fields"),
    }
    return options, extras



def completion_job(body: dict, tokenizer: Tokenizer, n_ctx: int, order: str = "psm", budget: int | None = None) -> Job:
    """llama.cpp's `POST /completion`: `prompt` (text or token ids) continued left to right; text
    written in a FIM template (SantaCoder's markers included, which llama.cpp reads as its special
    tokens here) fills in the middle, as on the other endpoints."""
    f = Fields(body, _LLAMA_COMMON | {"prompt"})
    options, extras = _llama_options(f, n_ctx)
    if "prompt" not in body:
        raise RequestError("'prompt' is required")
    if isinstance(body["prompt"], str):
        return text_prompt_job(tokenizer, body["prompt"], None, options, extras, n_ctx, order, budget)
    ids = encode_prompt(tokenizer, body["prompt"], n_ctx)
    return make_job(ids, options, extras, truncated=False)


def infill_job(body: dict, tokenizer: Tokenizer, n_ctx: int, order: str, budget: int | None = None) -> Job:
    """llama.cpp's `POST /infill`: fill in the middle between `input_prefix` (+ `prompt`, the text
    typed after it) and `input_suffix`, after the repository context `input_extra`."""
    f = Fields(body, _LLAMA_COMMON | {"input_prefix", "input_suffix", "input_extra", "prompt"})
    options, extras = _llama_options(f, n_ctx)
    extra = body.get("input_extra")
    prefix = _extra_context([] if extra is None else extra) + f.text("input_prefix") + f.text("prompt")
    return fim_job(tokenizer, prefix, f.text("input_suffix"), options, extras, n_ctx, order, budget)


def _extra_context(extra) -> str:
    if not isinstance(extra, list):
        raise RequestError("'input_extra' must be a list of {filename, text} objects")
    if len(extra) > MAX_EXTRA_CHUNKS:
        raise RequestError(f"'input_extra' takes at most {MAX_EXTRA_CHUNKS} chunks, got {len(extra)}")
    parts = []
    for chunk in extra:
        if not isinstance(chunk, dict):
            raise RequestError("each 'input_extra' item must be an object with a string 'text'")
        text, name = chunk.get("text") or "", chunk.get("filename") or ""  # (null: absent)
        if not isinstance(text, str):
            raise RequestError("each 'input_extra' item must be an object with a string 'text'")
        if not isinstance(name, str):
            raise RequestError("an 'input_extra' item's 'filename' must be a string")
        parts.append((f"# {name}\n" if name else "") + text + ("" if text.endswith("\n") else "\n"))
    return "".join(parts)




def tokenize_reply(body: dict, model) -> JSONResponse:
    """/tokenize: {"tokens": ids}, or with `with_pieces` llama.cpp's [{"id", "piece"}] (a piece
    that is not whole UTF-8 as its bytes, a list of numbers)."""
    f = Fields(body, {"content", "add_special", "with_pieces"})
    content = f.text("content", None)
    if content is None:
        raise RequestError("/tokenize takes {'content': string}")
    f.flag("add_special", False)  # (SantaCoder adds no BOS: nothing to add)
    check_text_size(content, "'content'", text_limit(model.tokenizer, model.config.n_positions))
    ids = model.tokenizer.encode(content)
    if not f.flag("with_pieces", False):
        return JSONResponse({"tokens": ids})
    n_ctx = model.config.n_positions
    if len(ids) > n_ctx:  # (a piece per id made answers ~19 times the text: 13 MB for 0.7 MB)
        raise RequestError(f"/tokenize with_pieces takes at most a context's worth of tokens ({n_ctx}), got {len(ids)}")
    pieces = []
    for i in ids:
        raw = model.tokenizer.token_bytes(i)
        try:
            pieces.append({"id": i, "piece": raw.decode("utf-8")})
        except UnicodeDecodeError:
            pieces.append({"id": i, "piece": list(raw)})
    return JSONResponse({"tokens": pieces})


def detokenize_reply(body: dict, model) -> JSONResponse:
    tokens = body.get("tokens")
    vocab, n_ctx = model.tokenizer.vocab_size, model.config.n_positions
    if isinstance(tokens, list) and len(tokens) > n_ctx:  # the reply grows by up to 128 characters an id
        raise RequestError(f"/detokenize takes at most a context's worth of ids ({n_ctx}), got {len(tokens)}")
    if (
        set(body) - {"tokens"}
        or not isinstance(tokens, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)
    ):
        raise RequestError(f"/detokenize takes {{'tokens': [token ids in 0..{vocab - 1}]}}")
    return JSONResponse({"content": model.tokenizer.decode(tokens)})


def routes(state: ServerState) -> list[Route]:
    """llama.cpp's endpoints over the shared state."""
    settings = state.settings

    async def health(request: Request) -> JSONResponse:
        if state.model is None:
            progress = state.loading_progress()
            return JSONResponse({"status": "loading", **({"progress": progress} if progress else {})}, 503)
        return JSONResponse({"status": "ok"})

    async def llama_completion(request: Request, build) -> object:
        model = state.ready_model()
        job = await body_work(request, build, model)
        runs = state.submit(job)
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

    async def completion(request: Request):
        return await llama_completion(
            request,
            lambda body, m: completion_job(body, m.tokenizer, m.config.n_positions, settings.fim_order, settings.fim_budget),
        )

    async def infill(request: Request):
        return await llama_completion(
            request,
            lambda body, m: infill_job(body, m.tokenizer, m.config.n_positions, settings.fim_order, settings.fim_budget),
        )

    async def tokenize(request: Request) -> JSONResponse:
        # Encoding and the reply's serialisation (up to ~1.5 MB) both off the event loop.
        return await body_work(request, tokenize_reply, state.ready_model())

    async def detokenize(request: Request) -> JSONResponse:
        return await body_work(request, detokenize_reply, state.ready_model())

    async def props(request: Request) -> JSONResponse:
        model = state.ready_model()
        return JSONResponse(
            {
                "default_generation_settings": {"n_ctx": model.config.n_positions, "model": SERVED_MODEL},
                "total_slots": settings.max_batch,
                "model_path": settings.model_name,
                "fim_order": settings.fim_order,
            }
        )

    return [
        Route("/health", health, methods=["GET"]),
        Route("/completion", completion, methods=["POST"]),
        Route("/completions", completion, methods=["POST"]),
        Route("/infill", infill, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/props", props, methods=["GET"]),
    ]


def llama_result(job: Job, run: CompletionText) -> dict:
    text = run.text()
    result = {
        "content": text,
        "id_slot": job.id_slot or 0,
        "stop": True,
        "model": SERVED_MODEL,
        "tokens_predicted": run.predicted,
        "tokens_evaluated": len(job.ids),
        "tokens_cached": run.sequence.stats.reused_tokens,
        "truncated": job.truncated,
        "stop_type": run.stop_type,
        "stopping_word": run.stopping_word,
        "has_new_line": "\n" in text,
        "timings": run.timings(),
    }
    return pick_fields(result, job.response_fields) if job.response_fields else result


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
