"""Request bodies -> what to generate: checked JSON fields (llama.cpp's names for `/completion` and
`/infill`, OpenAI's for `/v1/completions`), the prompt's token ids (fill-in-the-middle budgeted to
the context: the end of the prefix and the start of the suffix are kept, `truncated` says so) and
the `GenerationOptions`. Every problem is a `RequestError`: the app answers it as a 4xx with a
one-line JSON error.

Repository context (`/infill`'s `input_extra`, a list of `{filename, text}`): SantaCoder has no
file-separator token, so each chunk goes before the prefix as a comment line naming its file,
`# {filename}`, then its text: Python's own way of saying where code comes from, which the model
knows from its training data.

Bounded cost: a request's text work is bounded before any tokenizing. A plain prompt longer than
the context could hold (`n_ctx` times the longest token's characters) is refused; a FIM request's
prefix and suffix are first cut to that much text nearest the cursor (`truncated` says so), the
prefix's cut moving in whole `TEXT_CUT_STEP` characters so that it stays put while the user types.
Stop strings and `input_extra` chunks are bounded in number and size (a 400 names the limit).

May import: `santacpu.generation`, `santacpu.tokenizer`, `santacpu.errors` (no HTTP library).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..errors import SantacpuError
from ..generation.options import GenerationOptions
from ..generation.prompts import STARCODER_MARKERS, fim_options, fim_prompt_of_text
from ..tokenizer import Tokenizer

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far beyond any context's worth of text
# llama.cpp's sampling defaults (its /completion and /infill), and OpenAI's for /v1/completions.
LLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16}
MAX_SAMPLES = 16  # OpenAI's n
# Stop strings are matched at every token: a bounded number of bounded strings keeps that cheap.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_EXTRA_CHUNKS = 256  # llama.vim and llama.vscode keep 16 by default
MAX_LIST_STRINGS = 64  # `samplers`, `response_fields`: each is read for every response
TEXT_CUT_STEP = 4096


class RequestError(Exception):
    """A request the server refuses: `status` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Job:
    """One request's generation: the prompt ids, the options, how many samples, and the text-level
    stop rules the server applies beyond `options.stop`."""

    ids: list[int]
    options: GenerationOptions
    n: int = 1
    stream: bool = False
    truncated: bool = False
    n_indent: int = 0  # stop before a new line indented less than this (0: off)
    t_max_predict_ms: float = 0.0  # stop after this long once a newline was produced (0: off)
    id_slot: int | None = None
    response_fields: list[str] = field(default_factory=list)


def body_too_large() -> RequestError:
    return RequestError(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", 413, "request_too_large")


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large()
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # the decoder's own depth guard
        raise RequestError("the request body is not valid JSON for santacpu: nested too deeply") from None
    except ValueError:  # Python's guard against slow int conversion
        raise RequestError(
            f"the request body has an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _refuse_lone_surrogates(body)
    return body


def _refuse_lone_surrogates(body: dict) -> None:
    """JSON may escape half a UTF-16 pair ("\\ud800"); that is no text (nothing can encode it, not
    even the reply that would echo it), so it is refused in any string, naming the top-level field."""
    stack = [(repr(key)[1:-1], item) for key, value in body.items() for item in (key, value)]
    while stack:  # not recursive: the depth is the body's to choose
        field_name, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((field_name, part) for key, value in item.items() for part in (key, value))
        elif isinstance(item, list):
            stack.extend((field_name, part) for part in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as bad:
                raise RequestError(
                    f"'{field_name}' is not Unicode text: a lone surrogate (\\u{ord(item[bad.start]):04x}) at character {bad.start}"
                ) from None


def _shown(value) -> str:
    """A number as a message shows it: a huge one by its size."""
    text = str(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
    return text


class Fields:
    """Typed reads of a JSON object's fields; a field not in `known` is refused up front."""

    def __init__(self, body: dict, known: set[str]):
        unknown = sorted(set(body) - known)
        if unknown:
            raise RequestError(f"unknown field '{unknown[0]}'")
        self.body = body

    def get(self, name: str, kinds: tuple[type, ...], default, what: str):
        value = self.body.get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise RequestError(f"'{name}' must be {what}, got {type(value).__name__}")
        return value

    def integer(self, name: str, default: int | None, minimum: int, maximum: int) -> int | None:
        value = self.get(name, (int,), default, "an integer")
        if value is not None and not minimum <= value <= maximum:
            raise RequestError(f"'{name}' must be between {minimum} and {maximum}, got {_shown(value)}")
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.get(name, (int, float), default, "a number")
        # Comparisons are exact for any int (float() of a huge one overflows) and false for NaN.
        if not minimum <= value <= maximum:
            raise RequestError(f"'{name}' must be between {minimum} and {maximum}, got {_shown(value)}")
        return float(value)

    def text(self, name: str, default: str | None = "") -> str | None:
        return self.get(name, (str,), default, "a string")

    def flag(self, name: str, default: bool) -> bool:
        return self.get(name, (bool,), default, "true or false")

    def strings(self, name: str, most: int = MAX_LIST_STRINGS) -> list[str]:
        value = self.body.get(name, [])
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RequestError(f"'{name}' must be a string or a list of strings")
        if len(value) > most:
            raise RequestError(f"'{name}' takes at most {most} strings, got {len(value)}")
        return value

    def stop_strings(self, name: str) -> tuple[str, ...]:
        stops = self.strings(name, MAX_STOPS)
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise RequestError(f"each '{name}' string may be at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return tuple(stops)


# --- llama.cpp's /completion and /infill ------------------------------------------------------

_LLAMA_COMMON = {
    "n_predict", "temperature", "top_k", "top_p", "seed", "stop", "stream", "cache_prompt", "samplers",
    "response_fields", "id_slot", "n_indent", "t_max_prompt_ms", "t_max_predict_ms", "model", "n_probs",
    "n_cmpl", "lora",
}


def _llama_options(f: Fields, n_ctx: int) -> tuple[GenerationOptions, dict]:
    n_predict = f.integer("n_predict", -1, -1, 1 << 20)
    temperature = f.number("temperature", LLAMA_DEFAULTS["temperature"], 0.0, 100.0)
    top_k = f.integer("top_k", LLAMA_DEFAULTS["top_k"], 0, 1 << 20)
    top_p = f.number("top_p", LLAMA_DEFAULTS["top_p"], 0.0, 1.0)
    samplers = f.strings("samplers") if "samplers" in f.body else None
    if samplers is not None:  # llama.cpp's chain: a sampler left out does not apply
        top_k = top_k if "top_k" in samplers else 0
        top_p = top_p if "top_p" in samplers else 1.0
        temperature = temperature if "temperature" in samplers else (1.0 if samplers else 0.0)
    seed = f.integer("seed", -1, -1, (1 << 63) - 1)
    try:
        options = GenerationOptions.of(
            max_new_tokens=n_ctx if n_predict == -1 else n_predict,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if top_p > 0 else 1.0,
            seed=None if seed == -1 else seed,
            stop=f.stop_strings("stop"),
        )
    except SantacpuError as e:
        raise RequestError(str(e)) from None
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


def text_limit(tokenizer: Tokenizer, n_ctx: int) -> int:
    """The most characters that could be `n_ctx` tokens: more can never fit the context."""
    return n_ctx * tokenizer.max_token_bytes


def check_text_size(text: str, what: str, limit: int) -> str:
    if len(text) > limit:
        raise RequestError(f"{what} is {len(text)} characters: at most {limit} can fit the context")
    return text


def _encode_prompt(tokenizer: Tokenizer, prompt, n_ctx: int) -> list[int]:
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, str):
        ids = tokenizer.encode(check_text_size(prompt, "the prompt", text_limit(tokenizer, n_ctx)))
    else:
        raise RequestError("'prompt' must be a string or a list of token ids")
    if not ids:
        raise RequestError("the prompt is empty")
    if len(ids) >= n_ctx:
        raise RequestError(f"the prompt is {len(ids)} tokens but the context holds {n_ctx} (prompt and output together)")
    return ids


def completion_job(body: dict, tokenizer: Tokenizer, n_ctx: int) -> Job:
    """llama.cpp's `POST /completion`: `prompt` (text or token ids) continued left to right."""
    f = Fields(body, _LLAMA_COMMON | {"prompt"})
    options, extras = _llama_options(f, n_ctx)
    if "prompt" not in body:
        raise RequestError("'prompt' is required")
    ids = _encode_prompt(tokenizer, body["prompt"], n_ctx)
    return _job(ids, options, extras, truncated=False)


def infill_job(body: dict, tokenizer: Tokenizer, n_ctx: int, order: str, budget: int | None = None) -> Job:
    """llama.cpp's `POST /infill`: fill in the middle between `input_prefix` (+ `prompt`, the text
    typed after it) and `input_suffix`, after the repository context `input_extra`."""
    f = Fields(body, _LLAMA_COMMON | {"input_prefix", "input_suffix", "input_extra", "prompt"})
    options, extras = _llama_options(f, n_ctx)
    prefix = _extra_context(body.get("input_extra", [])) + f.text("input_prefix") + f.text("prompt")
    return _fim_job(tokenizer, prefix, f.text("input_suffix"), options, extras, n_ctx, order, budget)


def _extra_context(extra) -> str:
    if not isinstance(extra, list):
        raise RequestError("'input_extra' must be a list of {filename, text} objects")
    if len(extra) > MAX_EXTRA_CHUNKS:
        raise RequestError(f"'input_extra' takes at most {MAX_EXTRA_CHUNKS} chunks, got {len(extra)}")
    parts = []
    for chunk in extra:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text", ""), str):
            raise RequestError("each 'input_extra' item must be an object with a string 'text'")
        name = chunk.get("filename", "")
        if not isinstance(name, str):
            raise RequestError("an 'input_extra' item's 'filename' must be a string")
        text = chunk.get("text", "")
        parts.append((f"# {name}\n" if name else "") + text + ("" if text.endswith("\n") else "\n"))
    return "".join(parts)


def text_near_cursor(prefix: str, suffix: str, limit: int) -> tuple[str, str, bool]:
    """The end of `prefix` and the start of `suffix`, each at least `limit` characters where it is
    longer (all that could reach the prompt), and whether anything was cut. The prefix's cut moves
    in whole TEXT_CUT_STEP characters from its start, so it stays put while typing appends."""
    drop = max(0, len(prefix) - limit - TEXT_CUT_STEP)
    drop -= drop % TEXT_CUT_STEP
    return prefix[drop:], suffix[:limit], bool(drop) or len(suffix) > limit


def _fim_job(tokenizer, prefix: str, suffix: str, options, extras: dict, n_ctx: int, order: str, budget: int | None) -> Job:
    prefix, suffix, cut = text_near_cursor(prefix, suffix, text_limit(tokenizer, n_ctx))
    options = fim_options(options, tokenizer)
    # The answer's room: what was asked for, at most half the context (llama.cpp: n_predict).
    try:
        ids, truncated = fim_prompt_of_text(
            tokenizer, prefix, suffix, n_ctx, min(options.max_new_tokens, n_ctx // 2), order, budget
        )
    except SantacpuError as e:
        raise RequestError(str(e)) from None
    return _job(ids, options, extras, truncated or cut)


def _job(ids: list[int], options: GenerationOptions, extras: dict, truncated: bool) -> Job:
    if extras.get("n", 1) > 1 and extras["stream"]:
        raise RequestError("'stream' with 'n_cmpl' above 1 is not supported: ask for one completion per stream")
    return Job(
        ids=ids,
        options=options,
        n=extras.get("n", 1),
        stream=extras["stream"],
        truncated=truncated,
        n_indent=extras.get("n_indent", 0),
        t_max_predict_ms=extras.get("t_max_predict_ms", 0.0),
        id_slot=None if extras.get("id_slot", -1) == -1 else extras["id_slot"],
        response_fields=extras.get("response_fields", []),
    )


# --- OpenAI's /v1/completions -------------------------------------------------------------------

_OPENAI_FIELDS = {
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "user",
    "logprobs", "echo", "presence_penalty", "frequency_penalty", "best_of", "stream_options",
}


def split_starcoder_markers(prompt: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a raw prompt written with StarCoder's FIM markers
    (`<fim_prefix>PRE<fim_suffix>SUF<fim_middle>`, some editor clients' default template), else None."""
    pre, suf, mid = STARCODER_MARKERS[:3]
    if not (prompt.startswith(pre) and prompt.endswith(mid) and prompt.count(suf) == 1):
        return None
    prefix, suffix = prompt[len(pre) : -len(mid)].split(suf)
    return prefix, suffix


def openai_job(body: dict, tokenizer: Tokenizer, n_ctx: int, order: str, budget: int | None = None) -> Job:
    """OpenAI's `POST /v1/completions`; `suffix` (or a prompt with StarCoder-style FIM markers) fills
    in the middle."""
    f = Fields(body, _OPENAI_FIELDS)
    for unsupported, neutral in (("logprobs", None), ("echo", False), ("best_of", 1)):
        if body.get(unsupported, neutral) not in (neutral, None):
            raise RequestError(f"'{unsupported}' is not supported by santacpu")
    f.number("presence_penalty", 0.0, 0.0, 0.0)
    f.number("frequency_penalty", 0.0, 0.0, 0.0)
    f.text("user")
    f.text("model")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise RequestError("'stream_options' must be an object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string")
    max_tokens = f.integer("max_tokens", OPENAI_DEFAULTS["max_tokens"], 0, n_ctx)
    seed = f.integer("seed", None, 0, (1 << 63) - 1)
    try:
        options = GenerationOptions.of(
            max_new_tokens=max_tokens,
            temperature=f.number("temperature", OPENAI_DEFAULTS["temperature"], 0.0, 2.0),
            top_p=f.number("top_p", OPENAI_DEFAULTS["top_p"], 1e-9, 1.0),
            seed=seed,
            stop=f.stop_strings("stop"),
        )
    except SantacpuError as e:
        raise RequestError(str(e)) from None
    extras = {"stream": f.flag("stream", False)}
    n = f.integer("n", 1, 1, MAX_SAMPLES)
    suffix = f.text("suffix", None)
    markers = split_starcoder_markers(prompt) if suffix is None else None
    if markers is not None:
        prompt, suffix = markers
    if suffix is not None:
        job = _fim_job(tokenizer, prompt, suffix, options, extras, n_ctx, order, budget)
    else:
        job = _job(_encode_prompt(tokenizer, prompt, n_ctx), options, extras, truncated=False)
    job.n = n
    return job
