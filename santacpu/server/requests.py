"""Request bodies -> what to generate, the parts every dialect shares: the body's JSON (bounded,
UTF-8, no lone surrogates), typed field reads (`Fields`), the prompt's token ids (plain, or
fill-in-the-middle budgeted to the context: the end of the prefix and the start of the suffix are
kept, `truncated` says so; a prompt written in a client's FIM template is rebuilt as SantaCoder's),
and the `Job` handed to the worker. Each dialect's module (`llama_api`, `openai_api`, `ollama_api`)
reads its own field names with these. Every problem is a `RequestError`: the app answers it as a
4xx with a one-line JSON error in the dialect's shape.

Bounded cost: a request's text work is bounded before any tokenizing. A plain prompt longer than
the context could hold (`n_ctx` times the longest token's characters) is refused; a FIM request's
prefix and suffix are first cut to that much text nearest the cursor (`truncated` says so), the
prefix's cut moving in whole steps so that it stays put while the user types
(`generation.prompts.text_near_cursor`, inside `fim_prompt_of_text`).
Stop strings are bounded in number and size (a 400 names the limit).

May import: `santacpu.generation`, `santacpu.tokenizer`, `santacpu.errors`, the server's
`fim_templates` (no HTTP library).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field

from ..errors import SantacpuError
from ..generation.options import GenerationOptions
from ..generation.prompts import fim_options, fim_prompt_of_text, text_limit
from ..tokenizer import Tokenizer
from .fim_templates import split_fim_template

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far beyond any context's worth of text
# JSON values a body may hold, counted as its commas and brackets (text included, which only
# overcounts): any number up to MAX_JSON_ITEMS, beyond that one in JSON_ITEM_BYTES bytes. A 4 MiB
# body of "[]," (1.3 million arrays) took json.loads 0.4 s, in one call that holds the GIL, and the
# walk for lone surrogates 2 s more; code text has a comma or bracket in 20-50 bytes, so a 4 MiB
# FIM prefix of real code (cut to the context near the cursor later) still passes.
MAX_JSON_ITEMS = 1 << 16
JSON_ITEM_BYTES = 8
# Nesting a body may have: Python's JSON decoder refuses deep nesting only at its recursion guard,
# which differs between versions (about 1,000 levels on 3.11, several thousand on 3.13); a
# request never needs more than a few.
MAX_JSON_DEPTH = 64
TOO_DEEP = f"the request body is not valid JSON for santacpu: nested too deeply (over {MAX_JSON_DEPTH} levels)"
# \uD800-\uDFFF as a JSON escape: after an even run of backslashes ("\\ud800" is a backslash and text).
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F]")
MAX_SAMPLES = 16  # OpenAI's n, llama.vscode's n_cmpl
# Stop strings are matched at every token: a bounded number of bounded strings keeps that cheap.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_LIST_STRINGS = 64  # `samplers`, `response_fields`: each is read for every response


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
    include_usage: bool = False  # OpenAI's stream_options: a last chunk with the usage


def body_too_large() -> RequestError:
    return RequestError(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", 413, "request_too_large")


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large()
    items = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if items > max(MAX_JSON_ITEMS, len(raw) // JSON_ITEM_BYTES):
        raise RequestError(
            f"the request body holds too many JSON values: {items:,} commas and brackets in {len(raw):,} bytes "
            f"(at most {MAX_JSON_ITEMS:,}, or one in {JSON_ITEM_BYTES} bytes)", 413, "request_too_large"
        )
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # the decoder's own depth guard
        raise RequestError(TOO_DEEP) from None
    except ValueError:  # Python's guard against slow int conversion
        raise RequestError(
            f"the request body has an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if _nested_beyond(body, MAX_JSON_DEPTH):
        raise RequestError(TOO_DEEP)
    if _SURROGATE_ESCAPE.search(raw):  # (else no string can hold one: raw ones are no UTF-8)
        _refuse_lone_surrogates(body)
    return body


def _nested_beyond(body: dict, levels: int) -> bool:
    """Whether the body's lists and objects nest deeper than `levels` (the body itself is level 1);
    a walk over its containers, whose number MAX_JSON_ITEMS bounds."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > levels:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


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
    return str(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"


class Fields:
    """Typed reads of a JSON object's fields; a field not in `known` is refused up front. A field
    given as null is read as absent, as llama.cpp's server (`json_value`), OpenAI's (its nullable
    fields) and Ollama's (Go's zero values) read it."""

    def __init__(self, body: dict, known: set[str]):
        unknown = sorted(set(body) - known)
        if unknown:
            raise RequestError(f"unknown field '{unknown[0]}'")
        self.body = body

    def get(self, name: str, kinds: tuple[type, ...], default, what: str):
        value = self.body.get(name)
        if value is None:
            return default
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
        value = self.body.get(name)
        if value is None:
            return []
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


def generation_options(**fields) -> GenerationOptions:
    """The GenerationOptions of a request's fields (each dialect reads its own names); what the
    library refuses is the request's 400."""
    try:
        return GenerationOptions.of(**fields)
    except SantacpuError as e:
        raise RequestError(str(e)) from None


def check_text_size(text: str, what: str, limit: int) -> str:
    if len(text) > limit:
        raise RequestError(f"{what} is {len(text)} characters: at most {limit} can fit the context")
    return text


def encode_prompt(tokenizer: Tokenizer, prompt, n_ctx: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) >= n_ctx:  # (before looking at each id)
        raise RequestError(f"the prompt is {len(prompt)} tokens but the context holds {n_ctx} (prompt and output together)")
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


def fim_job(tokenizer, prefix: str, suffix: str, options, extras: dict, n_ctx: int, order: str, budget: int | None) -> Job:
    options = fim_options(options, tokenizer)
    # The answer's room: what was asked for, at most half the context (llama.cpp: n_predict).
    try:
        ids, truncated = fim_prompt_of_text(
            tokenizer, prefix, suffix, n_ctx, min(options.max_new_tokens, n_ctx // 2), order, budget
        )
    except SantacpuError as e:
        raise RequestError(str(e)) from None
    return make_job(ids, options, extras, truncated)  # (cut near the cursor, or trimmed to the context)


def make_job(ids: list[int], options: GenerationOptions, extras: dict, truncated: bool) -> Job:
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
        include_usage=extras.get("include_usage", False),
    )


def text_prompt_job(
    tokenizer: Tokenizer, prompt: str, suffix: str | None, options: GenerationOptions, extras: dict, n_ctx: int,
    order: str, budget: int | None,
) -> Job:
    """A text prompt's job: fill in the middle when a `suffix` is given or the prompt is written in a
    client's FIM template (`fim_templates`), else the prompt continued left to right."""
    if suffix is None:
        found = split_fim_template(prompt)
        if found is not None:
            prompt, suffix, _ = found
    if suffix is not None:
        return fim_job(tokenizer, prompt, suffix, options, extras, n_ctx, order, budget)
    return make_job(encode_prompt(tokenizer, prompt, n_ctx), options, extras, truncated=False)
