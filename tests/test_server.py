"""`santacpu serve`: every endpoint in process (Starlette's test client) and through a real uvicorn
on 127.0.0.1 (the official `openai` client, llama.vim's exact /infill body, concurrent clients,
a client that hangs up), stop rules, truncation, and hostile input. Greedy answers must equal the
library's own. Bounded: a few dozen requests on the tiny quantized model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import santacpu
from helpers import SlowSteps, tiny_checkpoint
from santacpu.backends.cpu import int_dot
from santacpu.server import build_app
from santacpu.server.app import ServerSettings
from santacpu.server.completion import IndentStop

pytestmark = pytest.mark.skipif(int_dot.ISA is None, reason="greedy answers compared bit for bit need the integer kernels")
starlette_testclient = pytest.importorskip("starlette.testclient")

PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from quantize.converter import convert

    return convert(tiny_checkpoint(), tmp_path_factory.mktemp("serve") / "tiny-q8_0.safetensors", qtype="q8_0", upgrade_budget=0).out


@pytest.fixture(scope="module")
def model(quantized):
    return santacpu.load(quantized)


def wait_ready(get) -> None:
    for _ in range(600):
        if get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the server never became ready")


def in_process(app):
    """Starlette's test client, as from this machine (the server answers Host names of it only)."""
    return starlette_testclient.TestClient(app, base_url="http://127.0.0.1:8012")


@pytest.fixture(scope="module")
def client(quantized):
    app = build_app(ServerSettings(model_name="tiny"), lambda: santacpu.load(quantized))  # (max_batch 8, as served)
    with in_process(app) as test_client:
        wait_ready(test_client.get)
        yield test_client


class LiveServer:
    """A real uvicorn on 127.0.0.1 (a free port), in a thread, for the duration of a test module;
    ready to generate unless `wait` is False."""

    def __init__(self, app, wait: bool = True):
        from santacpu.server import uvicorn_server

        self.server = uvicorn_server(app, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.app = app
        if wait:
            wait_ready(lambda path: httpx.get(self.url + path, timeout=10))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(quantized):
    server = LiveServer(build_app(ServerSettings(model_name="tiny", max_batch=4), lambda: santacpu.load(quantized)))
    yield server
    server.stop()


def sse_data(text: str) -> list[str]:
    return [line[len("data:") :].strip() for line in text.splitlines() if line.startswith("data:")]


def free_port() -> int:
    """A port on loopback that nothing listens on (for a server started as a child process)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str) -> None:
    """Until the server at `url` answers /health with 200 (a minute at most)."""
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not become healthy within a minute")


# --- in process -------------------------------------------------------------------------------


def test_health_is_503_while_the_model_loads(quantized):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return santacpu.load(quantized)

    app = build_app(ServerSettings(model_name="tiny"), slow_load)
    with in_process(app) as c:
        assert c.get("/health").status_code == 503
        refused = c.post("/completion", json={"prompt": "x", "n_predict": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        body = {"model": "santacoder", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
        with ThreadPoolExecutor(1) as pool:  # Ollama's clients expect a request to wait for the load
            waiting = pool.submit(c.post, "/api/generate", json=body)
            time.sleep(0.3)
            assert not waiting.done()
            release.set()
            assert waiting.result().json()["done"] is True
        wait_ready(c.get)
        assert c.get("/health").json() == {"status": "ok"}


def test_requests_that_wait_for_the_load_are_bounded(quantized, monkeypatch):
    # 2,000 Ollama requests waiting for a long load held 320 MB of bodies not yet read.
    from santacpu.server import service

    monkeypatch.setattr(service, "MAX_LOAD_WAITERS", 2)
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return santacpu.load(quantized)

    app = build_app(ServerSettings(model_name="tiny"), slow_load)
    body = {"model": "santacoder", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
    with in_process(app) as c, ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(c.post, "/api/generate", json=body) for _ in range(2)]
        for _ in range(100):
            if app.state.santacpu.load_waiters == 2:
                break
            time.sleep(0.05)
        refused = c.post("/api/generate", json=body)
        assert refused.status_code == 503 and "2 requests wait for it already" in refused.json()["error"]
        release.set()
        assert [w.result().status_code for w in waiting] == [200, 200]
        assert app.state.santacpu.load_waiters == 0


def test_completion_equals_the_librarys_greedy_answer(client, model):
    reply = client.post("/completion", json={"prompt": "def f(x):", "n_predict": 8, "temperature": 0})
    assert reply.status_code == 200
    body = reply.json()
    assert body["content"] == model.complete("def f(x):", max_new_tokens=8)
    assert body["stop"] is True and body["stop_type"] == "limit" and body["tokens_predicted"] == 8
    assert body["tokens_evaluated"] == len(model.tokenizer.encode("def f(x):")) and body["truncated"] is False
    assert body["timings"]["predicted_n"] == 8 and body["timings"]["prompt_n"] == body["tokens_evaluated"]
    by_ids = client.post("/completion", json={"prompt": model.tokenizer.encode("def f(x):"), "n_predict": 8, "temperature": 0})
    assert by_ids.json()["content"] == body["content"]


def test_streamed_completion_and_infill(client, model):
    reply = client.post("/completion", json={"prompt": "x = [", "n_predict": 6, "temperature": 0, "stream": True})
    events = [json.loads(d) for d in sse_data(reply.text)]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events[:-1]) == events[-1]["content"] == model.complete("x = [", max_new_tokens=6)
    infill = client.post(
        "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6, "temperature": 0}
    ).json()
    assert infill["content"] == model.complete(PREFIX, SUFFIX, max_new_tokens=6, fim_order="spm")


def test_stop_words_and_limits(client, model):
    free = model.complete("def f(x):", max_new_tokens=10)
    word = free[2:5]
    body = client.post("/completion", json={"prompt": "def f(x):", "n_predict": 10, "temperature": 0, "stop": [word]}).json()
    assert body["content"] == free[: free.index(word)]
    assert body["stop_type"] == "word" and body["stopping_word"] == word
    none = client.post("/completion", json={"prompt": "def f(x):", "n_predict": 0}).json()
    assert none["content"] == "" and none["tokens_predicted"] == 0 and none["stop_type"] == "limit"


def test_indent_stop_drops_the_first_line_indented_less():
    stop = IndentStop(4)
    text = stop.push("x = 1\n    y = 2\n") + stop.push("  ") + stop.push("z = 3\n")
    assert text == "x = 1\n    y = 2" and stop.stopped
    blank = IndentStop(4)
    assert blank.push("a\n\n        b\nc") + blank.flush() == "a\n\n        b" and blank.stopped
    assert IndentStop(0).push("a\nb") == "a\nb"


def test_consecutive_requests_reuse_the_common_prefix(client):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "temperature": 0}
    first = client.post("/infill", json=body).json()
    again = client.post("/infill", json=body).json()
    assert again["content"] == first["content"]
    assert again["tokens_cached"] == again["tokens_evaluated"] - 1 and again["timings"]["prompt_n"] == 1
    typed = client.post("/infill", json={**body, "input_prefix": PREFIX + "a"}).json()
    assert 0 < typed["tokens_cached"] < typed["tokens_evaluated"]


def test_a_long_infill_is_truncated_not_refused(client):
    long_prefix = "x = 1\n" * 200
    body = client.post("/infill", json={"input_prefix": long_prefix, "input_suffix": "y = 2\n" * 200, "n_predict": 4}).json()
    assert body["truncated"] is True and body["tokens_evaluated"] <= 64 - 4


def test_a_whole_large_source_file_as_the_prefix_is_cut_not_refused(client):
    # The JSON-values bound counts commas and brackets in text too: ~3.5 MB of real code (santacpu's
    # own, repeated) as the prefix, with a repository chunk, must still pass and be cut at the cursor.
    code = (Path(santacpu.__file__).parent / "model.py").read_text(encoding="utf-8")
    prefix = (code * (3_500_000 // len(code) + 1))[:3_500_000]
    body = {"input_prefix": prefix, "input_suffix": code[:2000], "n_predict": 1,
            "input_extra": [{"filename": "model.py", "text": code[:20_000]}]}
    reply = client.post("/infill", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["truncated"] is True


def test_llama_vim_requests(client):
    # The two bodies llama.vim sends (autoload/llama.vim): the context-only request, then a FIM request.
    warm = client.post(
        "/infill",
        json={"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": [{"text": "import os\n", "time": 1, "filename": "a.py"}],
              "prompt": "", "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
              "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]},
    )
    assert warm.status_code == 200 and warm.json() == {}
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms", "timings/prompt_per_second",
              "timings/predicted_n", "timings/predicted_ms", "timings/predicted_per_token_ms", "timings/predicted_per_second",
              "truncated", "tokens_cached"]
    reply = client.post(
        "/infill",
        json={"id_slot": 0, "input_prefix": "def f(x):\n", "input_suffix": "\n", "input_extra": [{"text": "import os\n", "time": 1, "filename": "a.py"}],
              "prompt": "    return", "n_predict": 8, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
              "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
              "t_max_predict_ms": 1000, "response_fields": fields},
    )
    assert reply.status_code == 200 and set(reply.json()) == set(fields)
    assert reply.json()["timings/predicted_n"] <= 8


def test_llama_vscode_request_with_parallel_completions(client):
    # llama.vscode's /infill body (src/llama-server.ts, createRequestPayload): n_cmpl completions
    # come back as a list of result objects.
    reply = client.post(
        "/infill",
        json={"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [], "prompt": "",
              "n_predict": 6, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
              "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
              "t_max_prompt_ms": 500, "t_max_predict_ms": 2500, "model": "santacoder"},
    )
    assert reply.status_code == 200
    results = reply.json()
    assert isinstance(results, list) and len(results) == 3
    assert all(isinstance(r["content"], str) and r["tokens_predicted"] <= 6 for r in results)
    assert sum(r["timings"]["prompt_n"] for r in results) == results[0]["tokens_evaluated"] - results[0]["tokens_cached"]


def test_openai_shapes_and_starcoder_markers(client, model):
    body = client.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 5, "temperature": 0, "n": 2}).json()
    want = model.complete(PREFIX, SUFFIX, max_new_tokens=5, fim_order="spm")
    assert [c["text"] for c in body["choices"]] == [want, want] and body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] <= 10 and body["choices"][0]["finish_reason"] in ("length", "stop")
    marked = client.post(
        "/v1/completions", json={"prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", "max_tokens": 5, "temperature": 0}
    ).json()
    assert marked["choices"][0]["text"] == want


def test_tokenize_detokenize_props_models(client, model):
    tokens = client.post("/tokenize", json={"content": "def f(x):"}).json()["tokens"]
    assert tokens == model.tokenizer.encode("def f(x):")
    assert client.post("/detokenize", json={"tokens": tokens}).json()["content"] == "def f(x):"
    # A backslash followed by the text "ud800" is no surrogate (an even run of backslashes before the u).
    escaped = client.post("/tokenize", content=b'{"content": "\\\\ud800"}', headers={"content-type": "application/json"})
    assert escaped.status_code == 200 and escaped.json()["tokens"] == model.tokenizer.encode("\\ud800")
    assert client.get("/props").json()["default_generation_settings"]["n_ctx"] == 64
    assert client.get("/v1/models").json()["data"][0]["id"] == "santacoder"  # never a name with "gpt" (Continue)


@pytest.mark.parametrize(
    "path, content, status, fragment",
    [
        ("/completion", b"{not json", 400, "not valid JSON"),
        ("/completion", b"\xff\xfe", 400, "not valid UTF-8"),
        ("/completion", b"[1, 2]", 400, "must be a JSON object"),
        ("/completion", json.dumps({"prompt": 5}).encode(), 400, "'prompt' must be a string or a list of token ids"),
        ("/completion", json.dumps({"prompt": "x", "n_predict": -5}).encode(), 400, "'n_predict' must be between -1"),
        ("/completion", json.dumps({"prompt": "x", "n_predict": "8"}).encode(), 400, "'n_predict' must be an integer"),
        ("/completion", json.dumps({"prompt": "x", "temperature": True}).encode(), 400, "'temperature' must be a number"),
        ("/completion", json.dumps({"prompt": "x", "wat": 1}).encode(), 400, "unknown field 'wat'"),
        ("/completion", json.dumps({"prompt": ""}).encode(), 400, "the prompt is empty"),
        ("/completion", json.dumps({"prompt": "x " * 200}).encode(), 400, "the context holds 64"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(), 400, "'max_tokens' must be between 0 and 64"),
        ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 3}).encode(), 400, "'logprobs' is not supported"),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 0}).encode(), 400, "'n' must be between 1"),
        ("/infill", json.dumps({"input_prefix": 3}).encode(), 400, "'input_prefix' must be a string"),
        ("/infill", json.dumps({"input_extra": "x"}).encode(), 400, "'input_extra' must be a list"),
        ("/infill", json.dumps({"n_cmpl": 2, "stream": True}).encode(), 400, "'stream' with 'n_cmpl' above 1"),
        ("/infill", json.dumps({"lora": [{"id": 0, "scale": 0.5}]}).encode(), 400, "LoRA adapters"),
        ("/completion", json.dumps({"prompt": "x", "n_probs": 5}).encode(), 400, "'n_probs') are not supported"),
        ("/detokenize", json.dumps({"tokens": [-1]}).encode(), 400, "/detokenize takes"),
        ("/completion", b" " * (5 << 20), 413, "over 4 MiB"),
        ("/completion", b'{"prompt": "x \\ud800"}', 400, "'prompt' is not Unicode text: a lone surrogate (\\ud800) at character 2"),
        ("/infill", b'{"input_prefix": "a", "stop": ["\\udfff"]}', 400, "'stop' is not Unicode text"),
        ("/infill", b'{"input_extra": [{"filename": "\\udc80.py", "text": ""}]}', 400, "'input_extra' is not Unicode text"),
        ("/v1/completions", b'{"prompt": "x", "user": "\\ud83d"}', 400, "'user' is not Unicode text"),
        ("/completion", b'{"\\ud800": 1}', 400, "'\\ud800' is not Unicode text"),
        ("/tokenize", b'{"content": "\\ud800"}', 400, "'content' is not Unicode text"),
        ("/tokenize", b'{"content": "\\\\\\ud800"}', 400, "'content' is not Unicode text"),  # (an escaped backslash first)
        ("/completion", b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", 400, "an integer of more than 4300 digits"),
        ("/completion", json.dumps({"prompt": "x", "temperature": 10**400}).encode(), 400, "'temperature' must be between 0.0 and 100.0, got an integer of 401 digits"),
        ("/v1/completions", json.dumps({"prompt": "x", "top_p": -(10**400)}).encode(), 400, "'top_p' must be between"),
        ("/completion", json.dumps({"prompt": "x", "n_predict": 10**400}).encode(), 400, "'n_predict' must be between -1 and 1048576, got an integer of 401 digits"),
        ("/completion", b"[" * 100_000 + b"]" * 100_000, 413, "holds too many JSON values"),  # (counted before parsing)
        ("/infill", json.dumps({"response_fields": ["content"] * 65}).encode(), 400, "'response_fields' takes at most 64 strings, got 65"),
        ("/completion", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
        # Refused at the same depth on every Python (the decoder's own guard differs by version):
        ("/completion", b'{"prompt": ' + b"[" * 64 + b"]" * 64 + b"}", 400, "nested too deeply (over 64 levels)"),
        ("/completion", b'{"prompt": ' + b"[" * 63 + b"]" * 63 + b"}", 400, "'prompt' must be a string or a list of token ids"),
        # Cheap to send, dear to parse (json.loads holds the GIL: 0.4 s for 4 MiB of "[],"):
        ("/completion", b'{"prompt": "x", "junk": [' + b"[]," * 300_000 + b"[]]}", 413, "holds too many JSON values"),
        ("/completion", b'{"prompt": [' + b"0," * 300_000 + b"0]}", 413, "holds too many JSON values"),
        ("/completion", b'{"prompt": [' + b"0," * 30_000 + b"0]}", 400, "the prompt is 30001 tokens but the context holds 64"),
        ("/detokenize", json.dumps({"tokens": [1] * 65}).encode(), 400, "at most a context's worth of ids (64), got 65"),
        ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"1": 5}}).encode(), 400, "'logit_bias' is not supported"),
        ("/nowhere", b"{}", 404, "Not Found"),
        ("/completion/", b"{}", 404, "Not Found"),  # (an empty 307 to /completion had answered)
        # Python's True == 1 and 0 == False had let these through as their neutral values:
        ("/v1/completions", json.dumps({"prompt": "x", "best_of": True}).encode(), 400, "'best_of' is not supported"),
        ("/v1/completions", json.dumps({"prompt": "x", "best_of": 1.0}).encode(), 400, "'best_of' is not supported"),
        ("/v1/completions", json.dumps({"prompt": "x", "echo": 0}).encode(), 400, "'echo' is not supported"),
        ("/v1/completions", json.dumps({"prompt": "x", "stream_options": {"include_usage": "yes"}}).encode(), 400,
         "'include_usage' must be true or false"),
        ("/v1/completions", json.dumps({"prompt": "x", "stream_options": {"bogus": 1}}).encode(), 400,
         "unknown field 'bogus'"),
        ("/completion", json.dumps({"prompt": "x", "samplers": "k" * 65}).encode(), 400,
         "'samplers' takes at most 64 letters"),
        ("/tokenize", json.dumps({"content": "x", "with_pieces": [1]}).encode(), 400, "'with_pieces' must be true or false"),
        ("/tokenize", json.dumps({"content": "x " * 100, "with_pieces": True}).encode(), 400,
         "with_pieces takes at most a context's worth of tokens (64)"),
    ],
)
def test_hostile_input_gets_a_json_4xx_and_the_server_lives_on(client, path, content, status, fragment):
    reply = client.post(path, content=content, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and fragment in error["message"] and "\n" not in error["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": None, "stop": None, "temperature": None, "top_p": None,
                             "n": None, "stream": None, "user": None, "model": None, "suffix": None, "seed": 7,
                             "presence_penalty": None, "frequency_penalty": None, "logit_bias": {}, "logprobs": None}),
        ("/v1/completions", {"prompt": "x", "temperature": 0, "max_tokens": 2, "seed": None, "logit_bias": None,
                             "echo": None, "best_of": None}),
        ("/completion", {"prompt": "x", "n_predict": None, "stop": None, "temperature": None, "seed": 7,
                         "samplers": None}),
        ("/infill", {"input_prefix": "x", "input_extra": None, "input_suffix": None, "n_predict": 3, "seed": None,
                     "temperature": 0}),
        ("/infill", {"input_prefix": "x", "n_predict": 3, "temperature": 0,
                     "input_extra": [{"filename": None, "text": "y = 1\n"}, {"filename": "a.py", "text": None}]}),
        ("/api/generate", {"model": "santacoder", "prompt": "x", "suffix": None, "images": None, "context": None,
                           "stream": False, "options": {"num_predict": None, "temperature": None, "stop": None,
                                                        "seed": 7}}),
    ],
    ids=["openai nullable fields", "openai unsupported as null", "llama.cpp", "llama.cpp infill", "input_extra items",
         "ollama"],
)
def test_null_is_a_field_left_out(client, path, body):
    # OpenAI's spec marks these fields nullable, llama.cpp's json_value and Go's decoding read null
    # as absent; clients send it (and an empty logit_bias).
    def left_out(value):
        if isinstance(value, dict):
            return {k: left_out(v) for k, v in value.items() if v is not None and v != {}}
        if isinstance(value, list):
            return [left_out(v) for v in value]
        return value

    with_nulls, without = client.post(path, json=body), client.post(path, json=left_out(body))
    assert with_nulls.status_code == 200 == without.status_code, with_nulls.text
    text = {"/v1/completions": lambda r: r["choices"][0]["text"], "/api/generate": lambda r: r["response"]}.get(
        path, lambda r: r["content"])
    assert text(with_nulls.json()) == text(without.json())


def test_more_samples_than_the_server_ever_holds_are_a_400_not_a_503(quantized):
    # A 503 says "retry later", and a client would retry for ever.
    app = build_app(ServerSettings(model_name="tiny", max_batch=1, max_queue=0), lambda: santacpu.load(quantized))
    with in_process(app) as c:
        wait_ready(c.get)
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 2}),
                           ("/infill", {"input_prefix": "x", "n_predict": 1, "n_cmpl": 2})):
            reply = c.post(path, json=body)
            assert reply.status_code == 400, reply.text
            assert "2 completions in one request: at most 1, half of the server's batch (--max-batch 1)" in reply.text


def test_one_request_asks_for_at_most_half_the_batch(client):
    # Found by a red team: n 16 of 2,000 tokens held every slot, and a 4-token request waited 33 s
    # (llama.cpp refuses n_cmpl above its slots).
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 5}),
                       ("/infill", {"input_prefix": "x", "n_predict": 1, "n_cmpl": 5})):
        reply = client.post(path, json=body)
        assert reply.status_code == 400 and "5 completions in one request: at most 4" in reply.text, reply.text
    assert len(client.post("/infill", json={"input_prefix": "x", "n_predict": 1, "n_cmpl": 4}).json()) == 4


def test_api_key(quantized):
    app = build_app(ServerSettings(model_name="tiny", api_key="sekret", max_queue=0), lambda: santacpu.load(quantized))
    with in_process(app) as c:
        wait_ready(c.get)  # /health needs no key
        assert c.post("/completion", json={"prompt": "x"}).status_code == 401
        wrong = c.post("/completion", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        idle = c.post("/completion", json={"prompt": "x", "n_predict": 2}, headers={"Authorization": "Bearer sekret"})
        assert idle.status_code == 200  # max_queue 0: nothing waits, but the idle batch has room (a full one: below)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        # The scheme's name in any case (as HTTP has it), or llama.cpp's other header; nothing else.
        for headers, status in (({"Authorization": "bearer sekret"}, 200), ({"X-Api-Key": "sekret"}, 200),
                                ({"X-Api-Key": "nope"}, 401), ({"Authorization": "Basic sekret"}, 401),
                                ({"Authorization": "sekret"}, 401), ({"Authorization": "Bearer sekret "}, 401)):
            assert c.get("/v1/models", headers=headers).status_code == status, headers


def test_dialect_details_as_their_servers_have_them(client, model):
    # Found by a red team against llama.cpp's and OpenAI's own servers.
    greedy = {"n_predict": 4, "temperature": 0, "seed": 1}
    # llama.cpp's samplers as letters: "kpt" is top_k, top_p, temperature (it had read as one unknown
    # name, so temperature 0 fell back to 1 and the output changed run to run).
    letters = [client.post("/completion", json={"prompt": "def f(", "samplers": "kpt", **greedy}).json()["content"]
               for _ in range(3)]
    names = client.post("/completion", json={"prompt": "def f(", "samplers": ["top_k", "top_p", "temperature"],
                                             **greedy}).json()["content"]
    assert letters == [names] * 3
    # /completion: a prompt in SantaCoder's FIM markers fills in the middle, as llama.cpp's special
    # tokens do there (it had been 21 tokens of marker text).
    marked = client.post("/completion", json={"prompt": "<fim-prefix>def f(<fim-suffix>):<fim-middle>", **greedy}).json()
    infill = client.post("/infill", json={"input_prefix": "def f(", "input_suffix": "):", **greedy}).json()
    assert (marked["content"], marked["tokens_evaluated"]) == (infill["content"], infill["tokens_evaluated"])
    # OpenAI's stream_options.include_usage: a last chunk with the usage and no choices, before [DONE].
    reply = client.post("/v1/completions", json={"prompt": "def f(", "max_tokens": 3, "temperature": 0, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    events = sse_data(reply.text)
    assert events[-1] == "[DONE]" and all(json.loads(e)["choices"] for e in events[:-2])
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["usage"]["prompt_tokens"] == len(model.tokenizer.encode("def f("))
    # OpenAI's prompt as token ids (or a batch of one), as its API takes it.
    text = client.post("/v1/completions", json={"prompt": "def f(", "max_tokens": 3, "temperature": 0}).json()
    ids = model.tokenizer.encode("def f(")
    for prompt in (ids, [ids]):
        by_ids = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0}).json()
        assert by_ids["choices"][0]["text"] == text["choices"][0]["text"] and by_ids["usage"] == text["usage"]
    refused = client.post("/v1/completions", json={"prompt": ids, "suffix": "x", "max_tokens": 3})
    assert refused.status_code == 400 and "'suffix' needs a text prompt" in refused.text
    # /tokenize with_pieces: llama.cpp's [{id, piece}].
    pieces = client.post("/tokenize", json={"content": "def f():", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == model.tokenizer.encode("def f():")
    assert "".join(p["piece"] for p in pieces) == "def f():"


# --- a real server on 127.0.0.1 -----------------------------------------------------------------


def test_the_openai_client_streaming_and_not(live, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = model.complete(PREFIX, SUFFIX, max_new_tokens=6, fim_order="spm")
    done = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0)
    assert done.choices[0].text == want and done.usage.prompt_tokens > 0
    pieces = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0, stream=True)
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_clients_get_their_single_client_answers(live, model):
    prompts = ["def f(x):", "import os\n", "x = [", "class A:", "for i in", "# sum\n", "while True", "return "]
    want = [model.complete(p, max_new_tokens=8) for p in prompts]

    def ask(prompt: str) -> tuple[str, float]:
        started = time.perf_counter()
        reply = httpx.post(live.url + "/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0}, timeout=120)
        assert reply.status_code == 200
        return reply.json()["content"], time.perf_counter() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts * 3))
    assert [text for text, _ in results] == want * 3
    latencies = sorted(seconds for _, seconds in results)
    print(f"8 clients, 24 requests: p50 {latencies[len(latencies) // 2]:.3f} s, p95 {latencies[int(len(latencies) * 0.95)]:.3f} s")


@pytest.fixture
def slow_server(quantized):
    """A live server whose batched steps take 50 ms more each."""

    def slowed():
        model = santacpu.load(quantized)
        model.engine = SlowSteps(model.engine)
        return model

    server = LiveServer(build_app(ServerSettings(model_name="tiny"), slowed))
    yield server
    server.stop()


def test_a_client_that_hangs_up_frees_the_model(slow_server):
    server = slow_server
    scheduler = server.app.state.santacpu.worker.scheduler
    with httpx.stream(
        "POST", server.url + "/completion", json={"prompt": "def f(x):", "n_predict": 50, "stream": True}, timeout=60
    ) as reply:
        lines = 0
        for line in reply.iter_lines():
            lines += line.startswith("data:")
            if lines == 2:
                [sequence] = scheduler.running
                break  # hang up after two streamed pieces: 48 tokens (2.4 s) were still to come
    hung_up = time.perf_counter()
    while sequence.state == "running" and time.perf_counter() - hung_up < 10.0:
        time.sleep(0.01)
    assert sequence.state == "cancelled" and len(sequence.tokens) < 50  # (not run to its end)
    assert not scheduler.running
    follow = httpx.post(server.url + "/completion", json={"prompt": "x", "n_predict": 2}, timeout=60)
    assert follow.status_code == 200


def test_the_exit_signal_ends_in_flight_requests_with_a_stop_reason(slow_server):
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from sse_starlette.sse import AppStatus

    server = slow_server
    scheduler = server.app.state.santacpu.worker.scheduler
    body = {"prompt": "def f(x):", "n_predict": 50, "temperature": 0}
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, server.url + "/completion", json=body, timeout=60)
            # In flight, not merely sent: a request still queued when the signal comes is refused.
            deadline = time.monotonic() + 30
            while not scheduler.running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert scheduler.running, "the first request never started"
            with httpx.stream("POST", server.url + "/completion", json={**body, "stream": True}, timeout=60) as reply:
                events = []
                for line in reply.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[len("data:"):]))
                        if len(events) == 2:  # 48 tokens (2.4 s) still to come
                            signalled = time.perf_counter()
                            server.server.handle_exit(signal.SIGINT, None)
            answered = waiting.result(timeout=30)
        server.thread.join(timeout=30)
        stopped = time.perf_counter() - signalled
    finally:
        AppStatus.should_exit = False  # sse-starlette's flag is process-wide: later tests stream again
    final = events[-1]
    assert final["stop"] is True and final["stop_type"] == "limit" and final["tokens_predicted"] < 50
    assert "".join(e["content"] for e in events[:-1]) == final["content"]
    assert answered.status_code == 200 and answered.json()["stop_type"] == "limit"
    assert answered.json()["tokens_predicted"] < 50
    assert not server.thread.is_alive() and stopped < 5.0


def test_the_serve_command_starts_answers_and_stops_on_sigint(quantized, tmp_path):
    import signal
    import subprocess
    import sys

    from helpers import default_sigint, santacpu_env

    port = free_port()
    (tmp_path / "key").write_text("from-a-file\n")  # a key on the command line is visible to every local user
    process = subprocess.Popen(
        [sys.executable, "-m", "santacpu", "serve", "--model", str(quantized), "--port", str(port),
         "--api-key-file", str(tmp_path / "key")],
        env=santacpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 3}
        assert httpx.post(url + "/infill", json=body, timeout=60).status_code == 401
        reply = httpx.post(url + "/infill", json=body, headers={"Authorization": "Bearer from-a-file"}, timeout=60)
        assert reply.status_code == 200 and reply.json()["tokens_predicted"] <= 3
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode in (0, 130), err
    assert "Traceback" not in err and f"http://127.0.0.1:{port}" in out
    assert f"santacpu serve: ready: {quantized} on cpu" in out  # and which kernels: model.device


# `run_server` in a child of its own (signals reach only a main thread) as `santacpu serve` runs it,
# with every batched step slowed by 50 ms so that requests are still running when the signal comes.
SLOW_SERVE = """
import signal, sys, time
import santacpu
from santacpu.cli.entry import _raise_terminated
from santacpu.server import run_server
from santacpu.server.service import ServerSettings
sys.path.insert(0, sys.argv[3])
from helpers import SlowSteps

class CountedSteps(SlowSteps):  # each step's number of sequences, one line a step, for the test to see
    def forward_batch(self, caches, *args):
        with open(sys.argv[4], "a") as steps:
            steps.write(f"{len(caches)}\\n")
        return super().forward_batch(caches, *args)

def load():
    model = santacpu.load(sys.argv[1])
    model.engine = CountedSteps(model.engine)
    return model

signal.signal(signal.SIGTERM, _raise_terminated)  # as the CLI's entry point does
run_server(ServerSettings(model_name="tiny"), load, "127.0.0.1", int(sys.argv[2]))
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_real_exit_signal_ends_in_flight_requests_with_what_they_have(quantized, signal_name, tmp_path):
    # On Python 3.11 a signal that interrupted Thread.join(timeout) left the HTTP thread marked as
    # ended: the process exited at once and every request in flight was cut, unanswered.
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from helpers import default_sigint, santacpu_env

    port, steps = free_port(), tmp_path / "steps"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, str(quantized), str(port), str(Path(__file__).parent),
                                str(steps)],
                               env=santacpu_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)

    def both_running() -> bool:  # a step of two sequences: the request that is not streamed is in flight too
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if steps.exists() and "2" in steps.read_text().split():
                return True
            time.sleep(0.01)
        return False

    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        body = {"prompt": "def f(x):", "n_predict": 50, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, url + "/completion", json=body, timeout=60)
            with httpx.stream("POST", url + "/completion", json={**body, "stream": True}, timeout=60) as reply:
                events = []
                for line in reply.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[len("data:"):]))
                        if len(events) == 2:  # 48 tokens (2.4 s) still to come
                            assert both_running(), "the two requests never ran in one step"
                            process.send_signal(getattr(signal, signal_name))
            answered = waiting.result(timeout=30)
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit", events[-1]
    assert answered.status_code == 200 and answered.json()["stop_type"] == "limit"
    assert answered.json()["tokens_predicted"] < 50


def test_a_client_that_hangs_up_mid_body_is_no_server_error(live, capfd):
    import socket

    for path in ("/completion", "/v1/completions", "/api/generate"):
        with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as half:
            half.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{\"prompt\":".encode())
            time.sleep(0.2)
    time.sleep(0.5)
    assert httpx.get(live.url + "/health", timeout=5).status_code == 200
    logged = capfd.readouterr().err
    assert "internal error" not in logged and "Traceback" not in logged, logged[-2000:]


class FailingOnce:
    """The engine, but its first call of `method` raises (a kernel bug, memory)."""

    def __init__(self, engine, method: str):
        self.engine, self.method, self.failed = engine, method, False

    def __getattr__(self, name):
        call = getattr(self.engine, name)
        if name != self.method or self.failed:
            return call

        def fail(*args):
            self.failed = True
            raise MemoryError("no room for the step")

        return fail


@pytest.mark.parametrize("method", ["forward_batch", "forward", "new_cache"],
                         ids=["a batched step", "a prompt's computation", "a cache's allocation"])
def test_a_step_that_raises_ends_the_requests_in_flight_and_the_server_goes_on(quantized, capfd, method):
    # The generation thread had no guard: any error in a step would have left every request waiting
    # (and a sequence whose prompt failed to join was in neither the queue nor the batch).
    def failing():
        model = santacpu.load(quantized)
        model.engine = FailingOnce(model.engine, method)
        return model

    server = LiveServer(build_app(ServerSettings(model_name="tiny"), failing))
    try:  # (a real server and a client timeout: a request left waiting fails the test, not hangs it)
        body = {"prompt": "def f(x):", "n_predict": 8, "temperature": 0}
        first = httpx.post(server.url + "/completion", json=body, timeout=30)
        assert first.status_code == 200 and first.json()["tokens_predicted"] <= 1, first.text
        assert first.json()["tokens_predicted"] == (method == "forward_batch"), first.text
        second = httpx.post(server.url + "/completion", json=body, timeout=30)
        assert second.status_code == 200 and second.json()["tokens_predicted"] == 8, second.text
    finally:
        server.stop()
    assert "internal error in generation" in capfd.readouterr().err


def test_request_bodies_held_are_bounded_in_bytes_until_their_work_is_done(live, monkeypatch):
    # Found by a red team: a body was counted only while it arrived, then waited for a text worker
    # uncounted (60 clients grew the server to 11 GB); and 64 stalled uploads of a few bytes each
    # held every generating endpoint at 503.
    import socket
    import threading

    from santacpu.server import service

    monkeypatch.setattr(service, "MAX_BODY_BUDGET", 1 << 20)
    port = int(live.url.rsplit(":", 1)[1])
    state = live.app.state.santacpu
    request = b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

    def held_bytes(expected) -> None:
        for _ in range(200):
            if state.body_bytes == expected:
                return
            time.sleep(0.05)
        assert state.body_bytes == expected

    stalled = []
    try:
        for _ in range(100):  # a byte each: they cost a byte each, not a request's worth
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(request + b"Content-Length: 1000\r\n\r\n{")
            stalled.append(connection)
        held_bytes(100)
        served = httpx.post(live.url + "/completion", json={"prompt": "x", "n_predict": 1}, timeout=30)
        assert served.status_code == 200, served.text
    finally:
        for connection in stalled:
            connection.close()
    held_bytes(0)

    # Bodies whose work waits (every text worker busy) stay counted: past the budget, 503.
    release, parse = threading.Event(), service._parsed_then

    def blocked(raw, function, *args):
        release.wait(30)
        return parse(raw, function, *args)

    monkeypatch.setattr(service, "_parsed_then", blocked)
    body = json.dumps({"input_prefix": "x = 1\n" * 45_000, "n_predict": 1})  # (cut to the context: valid)
    pool = ThreadPoolExecutor(6)
    try:
        waiting = [pool.submit(httpx.post, live.url + "/infill", content=body,
                               headers={"content-type": "application/json"}, timeout=60) for _ in range(3)]
        held_bytes(3 * len(body))  # (a fourth does not fit 1 MiB)
        refused = httpx.post(live.url + "/infill", content=body, headers={"content-type": "application/json"},
                             timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert "the server holds 1 MiB of request bodies already" in refused.json()["error"]["message"]
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
    finally:
        release.set()
        replies = [w.result() for w in waiting]
        pool.shutdown()
    assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
    held_bytes(0)


def test_connections_that_start_no_request_or_read_no_answer_are_closed(live, monkeypatch):
    # Sockets that sent nothing, or headers a byte at a time, stayed open for ever (1,100 of them
    # used up the descriptors and locked every client out); an answer nobody read stayed in memory.
    import socket

    from santacpu.server import connections

    monkeypatch.setattr(connections, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(connections, "WRITE_STALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(connections, "PIPELINED_BYTES_MAX", 64 << 10)
    port = int(live.url.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    closed_after = {}
    for name, connection in (("silent", silent), ("slow", slow)):
        while True:
            if name == "slow":
                try:
                    connection.sendall(b"P")  # (a byte a second: never a whole request)
                except OSError:
                    break
            connection.settimeout(1.0)
            try:
                if connection.recv(1) == b"":
                    break
            except socket.timeout:
                pass
            except OSError:
                break
            assert time.monotonic() - started < 20, f"the {name} connection is still open"
        closed_after[name] = time.monotonic() - started
        connection.close()
    assert max(closed_after.values()) < 10, closed_after
    # A client that asks for large answers and reads none of them: the answers pile up past the
    # kernel's buffers, the write stalls, and the connection is cut (its answers freed).
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", port))
    body = json.dumps({"content": "x = [" + "1, " * 2000 + "]"}).encode()
    request = (b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def send_all() -> None:
        try:
            for _ in range(400):  # (keep-alive: one answer after another, none read)
                reader.sendall(request)
        except OSError:  # (cut off meanwhile)
            pass

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    open_connections = live.server.server_state.connections
    stalled = set()
    most_held = 0  # pipelined bytes the server kept for it (200 MB in 30 s before the bound)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        most_held = max([most_held, *(len(c.conn._receive_buffer) for c in list(open_connections))])
        stalled |= {id(c) for c in open_connections if getattr(c, "_stalled", None)}
        if stalled and not stalled & {id(c) for c in open_connections}:
            break  # it stalled, and it is gone
        time.sleep(0.02)
    assert stalled, "no answer waited beyond the buffers"
    assert not stalled & {id(c) for c in open_connections}, "the stalled connection is still open"
    assert most_held <= (64 << 10) + (256 << 10), most_held  # (the bound, and one read past it)
    sender.join(timeout=10)
    reader.close()
    assert httpx.get(live.url + "/health", timeout=10).status_code == 200


def test_the_listening_socket_is_tcp_by_name():
    # With proto 0, asyncio set no TCP_NODELAY on accepted sockets: each keep-alive request after
    # the first waited ~44 ms for the client's delayed ACK.
    import socket

    from santacpu.server import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_body_that_never_finishes_is_answered_408_and_frees_its_bytes(live, monkeypatch):
    # Stalled uploads held what they had sent for as long as their sockets stayed open.
    import socket

    from santacpu.server import service

    monkeypatch.setattr(service, "BODY_TIMEOUT_S", 1.0)
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"prompt\":")
        started = time.monotonic()
        reply = b""
        while b"}}" not in reply and time.monotonic() - started < 10:
            reply += connection.recv(65536)
    assert time.monotonic() - started < 5
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["message"] == "the request body did not arrive within 1 s"
    assert live.app.state.santacpu.body_bytes == 0


def test_the_fim_budget_caps_the_prompt(quantized):
    app = build_app(ServerSettings(model_name="tiny", fim_budget=24), lambda: santacpu.load(quantized))
    with in_process(app) as c:
        wait_ready(c.get)
        body = c.post("/infill", json={"input_prefix": "x = 1\n" * 20, "input_suffix": "y = 2\n" * 20, "n_predict": 2}).json()
        assert body["truncated"] is True and body["tokens_evaluated"] <= 24


def test_soak_a_thousand_requests_keep_memory_flat(client):
    from santacpu.bench.machine import current_rss_mb

    def ask(i: int) -> None:
        reply = client.post("/completion", json={"prompt": f"x = {i}", "n_predict": 1, "temperature": 0})
        assert reply.status_code == 200

    for i in range(100):  # warm: caches kept, allocator pools filled
        ask(i)
    before = current_rss_mb()
    for i in range(1000):
        ask(i)
    assert current_rss_mb() - before < 40


def test_t_max_predict_ms_stops_after_a_newline_once_the_time_is_up():
    from santacpu.generation.options import GenerationOptions
    from santacpu.server.completion import CompletionText
    from santacpu.server.requests import Job
    from santacpu.tokenizer import Tokenizer

    job = Job(ids=[1], options=GenerationOptions(), t_max_predict_ms=100)
    text = CompletionText(feed=None, tokenizer=Tokenizer.santacoder(), job=job, submitted=time.perf_counter())
    text.first_token_at = time.perf_counter()
    assert text._text("a = 1") == "a = 1" and text.stop_type == "none"
    text.first_token_at -= 1.0  # a second later
    assert text._text("b = 2") == "b = 2" and text.stop_type == "none"  # no newline yet: go on
    assert text._text("\nc") == "\nc" and text.stop_type == "limit"


def test_a_newer_request_of_the_same_slot_cancels_the_older(slow_server):
    server = slow_server
    scheduler = server.app.state.santacpu.worker.scheduler
    body = {"prompt": "def f(x):", "n_predict": 50, "stream": True, "id_slot": 3}
    with httpx.stream("POST", server.url + "/completion", json=body, timeout=60) as older:
        lines = older.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        [first] = scheduler.running
        newer = httpx.post(server.url + "/completion", json={**body, "stream": False, "n_predict": 2}, timeout=60)
        assert newer.status_code == 200
        rest = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert first.state == "cancelled" and len(first.tokens) < 50
    assert rest[-1]["stop"] is True
    for slot in range(10, 20):  # the slots of finished requests are not remembered
        done = httpx.post(server.url + "/completion", json={"prompt": "x", "n_predict": 1, "id_slot": slot}, timeout=60)
        assert done.status_code == 200
    assert len(server.app.state.santacpu.slots) <= 1


def test_a_model_that_fails_to_load_ends_the_server_with_its_error():
    failures = []

    def broken():
        raise MemoryError("no room")

    app = build_app(ServerSettings(model_name="tiny"), broken, failures.append)
    with in_process(app) as c:
        for _ in range(1500):
            if failures:
                break
            time.sleep(0.02)
        assert failures == ["the model failed to load: MemoryError: no room"]
        assert c.get("/health").status_code == 503


# --- bounded cost, refusals, listening, browsers, special tokens ---------------------------------


def health_latencies(url: str, until: threading.Event) -> list[float]:
    """Seconds each /health took, asked one after another until `until` is set."""
    latencies = []
    while not until.is_set():
        started = time.perf_counter()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - started)
    return latencies


def while_polling_health(url: str, request):
    """`request()`'s result, and how long /health took at most meanwhile."""
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(health_latencies, url, done)
        time.sleep(0.05)
        try:
            result = request()
        finally:
            done.set()
        return result, max(polling.result(timeout=30))


def test_stop_strings_are_bounded_and_the_server_stays_responsive(live):
    many = {"prompt": "def f(x):", "n_predict": 8, "temperature": 0, "stop": ["a!"] * 60_000}
    reply, slowest = while_polling_health(live.url, lambda: httpx.post(live.url + "/completion", json=many, timeout=60))
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "'stop' takes at most 16 strings, got 60000"
    assert slowest < 1.0
    long = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "stop": ["y" * 257]}, timeout=60)
    assert long.status_code == 400 and "each 'stop' string may be at most 256 characters, got one of 257" in long.text
    at_limits = {"prompt": "def f(x):", "n_predict": 8, "temperature": 0, "stop": [chr(0x4E00 + i) * 256 for i in range(16)]}
    assert httpx.post(live.url + "/completion", json=at_limits, timeout=60).status_code == 200


def test_long_text_is_bounded_before_tokenizing_and_off_the_event_loop(live, model):
    limit = 64 * model.tokenizer.max_token_bytes  # the tiny model's context, in the most characters it could hold
    huge = "x = 1\n" * 170_000  # 1M characters
    infill = {"input_prefix": huge, "input_suffix": huge, "n_predict": 2, "temperature": 0}
    reply, slowest = while_polling_health(live.url, lambda: httpx.post(live.url + "/infill", json=infill, timeout=60))
    assert reply.status_code == 200 and reply.json()["truncated"] is True
    assert slowest < 1.0  # tokenizing all of it on the event loop stalled /health for seconds
    assert reply.json()["tokens_evaluated"] <= 64
    plain = httpx.post(live.url + "/completion", json={"prompt": huge, "n_predict": 1}, timeout=60)
    assert plain.status_code == 400
    assert plain.json()["error"]["message"] == f"the prompt is {len(huge)} characters: at most {limit} can fit the context"
    chunks = [{"filename": f"f{i}.py", "text": "import os\n"} for i in range(10_000)]
    extra = httpx.post(live.url + "/infill", json={"input_extra": chunks, "input_prefix": "x"}, timeout=60)
    assert extra.status_code == 400 and extra.json()["error"]["message"] == "'input_extra' takes at most 256 chunks, got 10000"
    tokenize = httpx.post(live.url + "/tokenize", json={"content": huge}, timeout=60)
    assert tokenize.status_code == 400 and f"at most {limit}" in tokenize.text


def test_the_prefix_is_cut_in_whole_steps_so_typing_keeps_the_cut():
    from santacpu.generation.prompts import TEXT_CUT_STEP, text_near_cursor

    prefix = "".join(f"line {i}\n" for i in range(5000))
    cuts = {len(prefix + "a" * typed) - len(text_near_cursor(prefix + "a" * typed, "", 1000)[0]) for typed in range(50)}
    assert len(cuts) == 1 and cuts.pop() % TEXT_CUT_STEP == 0
    kept, suffix, cut = text_near_cursor(prefix, "y" * 1500, 1000)
    assert prefix.endswith(kept) and len(kept) >= 1000 and suffix == "y" * 1000 and cut
    assert text_near_cursor("short", "also short", 1000) == ("short", "also short", False)


class GatedSteps:
    """The engine, with every batched step waiting until `gate` is set."""

    def __init__(self, engine):
        self.engine, self.gate = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward_batch(self, *args):
        assert self.gate.wait(30)
        return self.engine.forward_batch(*args)


def test_max_queue_0_runs_what_fits_the_batch_and_refuses_the_rest(quantized):
    gated = []

    def load_gated():
        model = santacpu.load(quantized)
        model.engine = GatedSteps(model.engine)
        gated.append(model.engine)
        return model

    server = LiveServer(build_app(ServerSettings(model_name="tiny", max_batch=1, max_queue=0, api_key="sekret"), load_gated))
    key = {"Authorization": "Bearer sekret"}
    scheduler = server.app.state.santacpu.worker.scheduler
    try:
        gated[0].gate.set()
        idle = httpx.post(server.url + "/completion", json={"prompt": "x", "n_predict": 2}, headers=key, timeout=60)
        assert idle.status_code == 200 and idle.json()["tokens_predicted"] == 2
        gated[0].gate.clear()
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "def f(x):", "n_predict": 8, "temperature": 0}
            busy = pool.submit(httpx.post, server.url + "/completion", json=body, headers=key, timeout=60)
            for _ in range(3000):  # until it holds the batch's one slot (its steps wait at the gate)
                if scheduler.running:
                    break
                time.sleep(0.01)
            assert scheduler.running, "the first request never started"
            full = httpx.post(server.url + "/completion", json={"prompt": "x", "n_predict": 2}, headers=key, timeout=60)
            gated[0].gate.set()
            assert busy.result(timeout=60).status_code == 200
        assert full.status_code == 503 and full.headers["retry-after"] == "2"
        assert "the queue is full" in full.json()["error"]["message"]
    finally:
        gated[0].gate.set()
        server.stop()


def test_health_says_loading_with_progress_while_the_model_loads(quantized):
    from santacpu.progress import Progress

    stepped, release = threading.Event(), threading.Event()

    def quantize_then_load():
        progress = Progress(3, "quantizing")
        progress.step("layer 0")
        stepped.set()
        release.wait(30)
        progress.step("layer 1")
        progress.step("layer 2")
        return santacpu.load(quantized)

    server = LiveServer(build_app(ServerSettings(model_name="tiny"), quantize_then_load), wait=False)
    try:
        assert stepped.wait(30)
        loading = httpx.get(server.url + "/health", timeout=10)
        assert loading.status_code == 503
        body = loading.json()
        assert body["status"] == "loading" and body["progress"]["step"] == "quantizing"
        assert (body["progress"]["done"], body["progress"]["total"]) == (1, 3)
        release.set()
        wait_ready(lambda path: httpx.get(server.url + path, timeout=10))
    finally:
        release.set()
        server.stop()


def test_serve_listens_before_a_first_use_quantization(tmp_path):
    import signal
    import subprocess
    import sys

    from helpers import default_sigint, santacpu_env

    cache = tmp_path / "cache"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "santacpu", "serve", "--model", str(tiny_checkpoint()), "--port", str(port)],
        env=santacpu_env({"SANTACPU_CACHE": str(cache)}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint,
    )
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline()  # said once it listens
        quantized_before = list(cache.glob("*.safetensors"))
        first = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert quantized_before == [] and first.status_code == 503 and first.json()["status"] == "loading"
        wait_ready(lambda path: httpx.get(f"http://127.0.0.1:{port}" + path, timeout=10))
        assert len(list(cache.glob("*.safetensors"))) == 1
        body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/infill", json=body, timeout=60).status_code == 200
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode in (0, 130) and "Traceback" not in err, err


# In a fresh process: Model.warm_up (run by the server before it says it is ready) loads every
# kernel signature that requests of every kind then use, so none compiles during a request.
WARM_UP_COVERS = """
import gc, sys
from numba.core.dispatcher import Dispatcher
import santacpu
model = santacpu.load(sys.argv[1])
def signatures():
    return {(id(d), sig) for d in gc.get_objects() if isinstance(d, Dispatcher) for sig in d.overloads}
model.warm_up()
warm = signatures()
ids = [(7 * i) % 500 + 10 for i in range(model.config.n_positions - 8)]  # the tiny model's context: 64
list(model.generate(ids, max_new_tokens=4))
list(model.generate(ids[:24] + ids[:12], max_new_tokens=8, lookup=True))
model.complete_many(["def f(", ("def g(", "\\n")], max_new_tokens=4, n=2)
list(model.generate(ids[:20], max_new_tokens=4, temperature=0.8, top_k=5, top_p=0.9, seed=1))
print(len(warm), len(signatures() - warm))
"""


def test_the_warm_up_loads_every_kernel_a_request_uses(quantized):
    done = subprocess.run([sys.executable, "-c", WARM_UP_COVERS, str(quantized)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    loaded, added = map(int, done.stdout.split())
    assert loaded >= 5 and added == 0, done.stdout


def test_a_model_that_computes_nan_ends_the_server_before_ready(quantized, tmp_path):
    # The warm-up runs the model before "ready": damaged weights are one error line then, not an
    # error in every request after it.
    import numpy as np

    from helpers import rewrite_safetensors, run_santacpu

    def poison(tensors):
        tensors["wte.d"][7, 1] = np.nan  # an LM head row's scale

    nan = rewrite_safetensors(quantized, tmp_path / "nan.safetensors", tensors=poison)
    done = run_santacpu("serve", "--model", nan, "--port", free_port(), timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err and "serve: ready" not in done.stdout.decode(), err
    assert len(err.splitlines()) == 1 and err.startswith("santacpu: error: the model computed values that are not finite"), err


def test_serve_on_a_port_in_use_is_one_error_line_before_loading(quantized):
    import socket

    from helpers import one_error_line, run_santacpu

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.perf_counter()
        done = run_santacpu("serve", "--model", quantized, "--port", port, timeout=60)
    one_error_line(done, f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert time.perf_counter() - started < 30


def test_serve_with_a_model_path_that_does_not_exist_fails_before_listening(tmp_path):
    # It said "santacpu serve: http://..." and answered /health before the load found nothing there.
    from helpers import one_error_line, run_santacpu

    missing = tmp_path / "no-such-model"
    one_error_line(run_santacpu("serve", "--model", missing, "--port", "1", timeout=60),
                   f"no such file or folder: {missing}")  # (port 1 cannot be listened on: not reached)


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from santacpu.cli.serve import api_key_of
    from santacpu.errors import SantacpuError

    monkeypatch.setenv("SANTACPU_API_KEY", "from-the-environment")
    assert api_key_of(None, None) == "from-the-environment"
    assert api_key_of("given", None) == "given"
    (tmp_path / "key").write_text("  from-a-file\n")
    assert api_key_of(None, tmp_path / "key") == "from-a-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SantacpuError, match="must hold the key on one line"):
        api_key_of(None, tmp_path / "empty")
    with pytest.raises(SantacpuError, match="not both"):
        api_key_of("given", tmp_path / "key")
    for blank in ("", "   ", " key", "key "):
        with pytest.raises(SantacpuError, match="--api-key is empty or has spaces at its ends"):
            api_key_of(blank, None)
    monkeypatch.delenv("SANTACPU_API_KEY")
    assert api_key_of(None, None) is None


def test_browsers_cannot_drive_the_server(client):
    plain = client.post("/completion", content=json.dumps({"prompt": "x", "n_predict": 1}), headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["type"] == "unsupported_media_type"
    form = client.post("/infill", data={"input_prefix": "x"})
    assert form.status_code == 415 and "application/x-www-form-urlencoded" in form.json()["error"]["message"]
    charset = client.post("/tokenize", content=b'{"content": "x"}', headers={"content-type": "application/json; charset=utf-8"})
    assert charset.status_code == 200
    for host in ("evil.example", "evil.example:8012", "127.0.0.1.evil.example", ""):
        refused = client.get("/health", headers={"host": host})
        assert refused.status_code == 400 and "is not served here" in refused.json()["error"]["message"], host
        assert client.post("/tokenize", json={"content": "x"}, headers={"host": host}).status_code == 400
    for host in ("localhost:8012", "127.0.0.1", "[::1]:8012", "LOCALHOST"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_every_address_answers_every_host_name(quantized):
    app = build_app(ServerSettings(model_name="tiny", host="0.0.0.0"), lambda: santacpu.load(quantized))
    with starlette_testclient.TestClient(app, base_url="http://my-machine.lan:8012") as c:
        wait_ready(c.get)
        assert c.post("/tokenize", json={"content": "x"}).status_code == 200


class FimTokenAfter:
    """The engine, but from its `after`-th batched step on the model wants <fim-prefix> next (as a
    model can, starting another FIM document after the middle)."""

    def __init__(self, engine, token: int, after: int = 2):
        self.engine, self.token, self.after, self.steps = engine, token, after, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward_batch(self, *args):
        logits = self.engine.forward_batch(*args)
        self.steps += 1
        if self.steps >= self.after:
            for rows in logits:
                rows[:, self.token] = rows.max() + 100.0
        return logits


def test_fim_special_tokens_end_the_middle_and_are_never_text(quantized, model):
    def scripted():
        loaded = santacpu.load(quantized)
        loaded.engine = FimTokenAfter(loaded.engine, loaded.tokenizer.fim_prefix_id)
        return loaded

    app = build_app(ServerSettings(model_name="tiny"), scripted)
    with in_process(app) as c:
        wait_ready(c.get)
        body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, "temperature": 0, "samplers": []}
        infill = c.post("/infill", json=body).json()
        assert "<fim" not in infill["content"] and infill["stop_type"] == "eos" and infill["tokens_predicted"] < 8
        assert infill["content"] == model.complete(PREFIX, SUFFIX, max_new_tokens=infill["tokens_predicted"], fim_order="spm")
        openai = c.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0}).json()
        assert "<fim" not in openai["choices"][0]["text"] and openai["choices"][0]["finish_reason"] == "stop"
        plain = c.post("/completion", json={"prompt": "def f(x):", "n_predict": 6, "temperature": 0}).json()
        assert "<fim" not in plain["content"] and plain["tokens_predicted"] == 6


# --- Ollama's API and the clients' FIM templates (issue 29) -------------------------------------

# Each client's published FIM template, filled with PREFIX and SUFFIX: Continue's defaults
# (starcoder2, qwen, deepseek, codellama, codestral), llama.vscode's OpenAI mode (Qwen's markers),
# Tabby's `<|FIM|>` split, and SantaCoder's own markers written as text.
CLIENT_TEMPLATES = {
    "starcoder": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
    "qwen": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
    "deepseek": f"<｜fim▁begin｜>{PREFIX}<｜fim▁hole｜>{SUFFIX}<｜fim▁end｜>",
    "codellama": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
    "codestral": f"[SUFFIX]{SUFFIX}[PREFIX]{PREFIX}",
    "tabby": f"{PREFIX}<|FIM|>{SUFFIX}",
    "santacoder": f"<fim-prefix>{PREFIX}<fim-suffix>{SUFFIX}<fim-middle>",
}


def infill_middle(url: str, n_predict: int = 6) -> str:
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": n_predict, "temperature": 0}
    return httpx.post(url + "/infill", json=body, timeout=60).json()["content"]


def test_client_fim_templates_are_split_back_into_prefix_and_suffix():
    from santacpu.server.fim_templates import split_fim_template

    for name, prompt in CLIENT_TEMPLATES.items():
        assert split_fim_template(prompt) == (PREFIX, SUFFIX, name), name
    repo = "<|repo_name|>r\n<|file_sep|>a.py\nx = 1\n<|file_sep|>b.py\n"  # Qwen's repository context
    assert split_fim_template(repo + CLIENT_TEMPLATES["qwen"]) == (repo + PREFIX, SUFFIX, "qwen")
    for plain in ("def f(x):", "<fim_prefix>a<fim_suffix>b", "a <SUF> b <SUF> c <MID>", "<|FIM|>a<|FIM|>"):
        assert split_fim_template(plain) is None, plain


def test_the_ollama_client_generate_show_list(live, model):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=live.url, timeout=60)
    want = model.complete(PREFIX, SUFFIX, max_new_tokens=6, fim_order="spm")
    assert infill_middle(live.url) == want
    options = {"num_predict": 6, "temperature": 0, "num_ctx": 4096, "mirostat": 0}  # keys santacpu has no use for: ignored
    done = client.generate(model="santacoder", prompt=PREFIX, suffix=SUFFIX, options=options, keep_alive="5m")
    assert done.response == want and done.done and done.done_reason in ("stop", "length")
    assert done.eval_count <= 6 and done.prompt_eval_count > 0 and done.total_duration >= done.eval_duration > 0
    chunks = list(client.generate(model="santacoder", prompt=PREFIX, suffix=SUFFIX, options=options, stream=True))
    assert "".join(c.response for c in chunks) == want and chunks[-1].done and not any(c.done for c in chunks[:-1])
    raw = client.generate(model="santacoder", prompt=CLIENT_TEMPLATES["codellama"], raw=True, options=options)
    assert raw.response == want  # twinny's and Tabby's way: the client's own template, raw
    plain = client.generate(model="santacoder", prompt="def f(x):", options={"num_predict": 5, "temperature": 0})
    assert plain.response == model.complete("def f(x):", max_new_tokens=5)
    until_full = client.generate(model="santacoder", prompt="def f(x):", options={"num_predict": -1, "temperature": 0})
    assert until_full.eval_count + until_full.prompt_eval_count <= 64 and until_full.eval_count > 5
    load = client.generate(model="santacoder", prompt="")
    assert load.done and load.done_reason == "load" and load.response == ""
    show = client.show("santacoder")
    assert "{{ .Prompt }}" in show.template and "{{ .Suffix }}" in show.template and "insert" in show.capabilities
    assert show.details.family == "gpt_bigcode" and show.modelinfo["gpt_bigcode.context_length"] == 64
    assert [m.model for m in client.list().models] == ["santacoder"]
    assert client.ps().models[0].context_length == 64
    assert httpx.get(live.url + "/api/version").json()["version"]


def test_the_openai_client_with_each_client_fim_template(live, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = infill_middle(live.url)
    assert want == model.complete(PREFIX, SUFFIX, max_new_tokens=6, fim_order="spm")
    for name, prompt in CLIENT_TEMPLATES.items():
        done = client.completions.create(model="santacoder", prompt=prompt, max_tokens=6, temperature=0)
        assert done.choices[0].text == want, name
    assert [m.id for m in client.models.list()] == ["santacoder"]


def test_ollama_streams_ndjson_by_default(client, model):
    reply = client.post(
        "/api/generate",
        json={"model": "santacoder", "prompt": PREFIX, "suffix": SUFFIX, "options": {"num_predict": 6, "temperature": 0}},
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert "".join(c["response"] for c in lines) == model.complete(PREFIX, SUFFIX, max_new_tokens=6, fim_order="spm")
    last = lines[-1]
    assert last["done"] is True and last["response"] == "" and 0 < last["eval_count"] <= 6
    assert {"total_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration", "done_reason"} <= set(last)
    assert client.get("/").text == "Ollama is running"


def test_ollama_details_name_the_served_weights(client, model):
    # The size and level come from the loaded weights, not the name the server was given ("tiny").
    from safetensors import safe_open

    with safe_open(tiny_checkpoint() / "model.safetensors", "np") as f:
        count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".attn.bias"))
    show = client.post("/api/show", json={"model": "santacoder"}).json()
    assert show["model_info"]["general.parameter_count"] == count
    assert show["details"]["quantization_level"] == "Q8_0"
    assert show["details"]["parameter_size"] == f"{count / 1e6:.1f}M"
    assert client.get("/api/tags").json()["models"][0]["details"] == show["details"]


GOOD = {"model": "santacoder", "prompt": "x"}


@pytest.mark.parametrize(
    "path, content, status, fragment",
    [
        ("/api/generate", b"{not json", 400, "not valid JSON"),
        ("/api/generate", b"[1]", 400, "must be a JSON object"),
        ("/api/generate", json.dumps({"prompt": "x"}).encode(), 400, "model is required"),
        ("/api/generate", json.dumps({**GOOD, "prompt": 5}).encode(), 400, "'prompt' must be a string"),
        ("/api/generate", json.dumps({**GOOD, "suffix": ["x"]}).encode(), 400, "'suffix' must be a string"),
        ("/api/generate", json.dumps({**GOOD, "stream": "yes"}).encode(), 400, "'stream' must be true or false"),
        ("/api/generate", json.dumps({**GOOD, "raw": 1}).encode(), 400, "'raw' must be true or false"),
        ("/api/generate", json.dumps({**GOOD, "options": "hot"}).encode(), 400, "'options' must be an object"),
        ("/api/generate", json.dumps({**GOOD, "options": {"temperature": "hot"}}).encode(), 400, "'temperature' must be a number"),
        ("/api/generate", json.dumps({**GOOD, "options": {"num_predict": "8"}}).encode(), 400, "'num_predict' must be an integer"),
        ("/api/generate", json.dumps({**GOOD, "options": {"num_predict": 10**400}}).encode(), 400, "an integer of 401 digits"),
        ("/api/generate", json.dumps({**GOOD, "options": {"top_p": 2}}).encode(), 400, "'top_p' must be between"),
        ("/api/generate", json.dumps({**GOOD, "options": {"stop": [1]}}).encode(), 400, "'stop' must be a string or a list"),
        ("/api/generate", json.dumps({**GOOD, "options": {"stop": ["x"] * 17}}).encode(), 400, "'stop' takes at most 16"),
        ("/api/generate", json.dumps({**GOOD, "images": ["aGk="]}).encode(), 400, "'images' and 'context' are not supported"),
        ("/api/generate", json.dumps({**GOOD, "format": "json"}).encode(), 400, "'format' (structured output)"),
        ("/api/generate", json.dumps({**GOOD, "prompt": "x " * 200}).encode(), 400, "the context holds 64"),
        ("/api/generate", b'{"model": "s", "prompt": "x \\ud800"}', 400, "'prompt' is not Unicode text"),
        ("/api/generate", b" " * (5 << 20), 413, "over 4 MiB"),
        ("/api/generate", b'{"model": "s", "options": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
        ("/api/generate", b'{"model": "s", "prompt": "x", "junk": [' + b"[]," * 300_000 + b"[]]}", 413,
         "holds too many JSON values"),
        ("/api/show", json.dumps({}).encode(), 400, "model is required"),
        ("/api/show", json.dumps({"model": 3}).encode(), 400, "'model' must be a string"),
        ("/api/nowhere", b"{}", 404, "Not Found"),
    ],
)
def test_hostile_ollama_bodies_get_ollamas_error_shape(client, path, content, status, fragment):
    reply = client.post(path, content=content, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"error"} and isinstance(error["error"], str), error
    assert fragment in error["error"] and "\n" not in error["error"]
    assert client.get("/health").status_code == 200


def test_ollama_ignores_unknown_fields_and_keeps_the_servers_guards(client, quantized):
    body = {**GOOD, "wat": 1, "keep_alive": "5m", "stream": False, "options": {"num_predict": 1, "mirostat": 2, "numa": True}}
    assert client.post("/api/generate", json=body).json()["done"] is True
    plain = client.post("/api/generate", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    foreign = client.get("/api/tags", headers={"host": "evil.example"})
    assert foreign.status_code == 400 and "is not served here" in foreign.json()["error"]
    app = build_app(ServerSettings(model_name="tiny", api_key="sekret"), lambda: santacpu.load(quantized))
    with in_process(app) as c:
        wait_ready(c.get)
        refused = c.post("/api/generate", json=body)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        assert c.get("/api/tags", headers={"Authorization": "Bearer sekret"}).status_code == 200


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS\r\n\r\n",
                                     b"GET /health HTTP/1.1\r\nHost: a\r\nbad header line\r\n\r\n",
                                     b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"])
def test_malformed_http_is_answered_with_the_json_error(live, garbage):
    # uvicorn answered bytes that are not HTTP in plain text; every other refusal is JSON.
    import socket

    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(garbage)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    assert b"content-type: application/json" in head.lower(), head
    assert json.loads(body)["error"] == {"code": 400, "message": "the request is not valid HTTP/1.1",
                                         "type": "invalid_request_error"}
    assert httpx.get(live.url + "/health", timeout=10).status_code == 200


def test_token_counts_end_at_the_token_that_completed_a_stop_string(tmp_path):
    # The counts were every token the sequence made: lookup drafts accepted past the stop in the
    # same step, and the steps the generation ran before the cancel reached it (4 where the text
    # took 2; 23 and 30 under load).
    import warnings

    from quantize.converter import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fixture has no tokenizer.json: the bundled one)
        trained = convert(Path(__file__).parent / "fixtures" / "trained_tiny", tmp_path / "trained-q8_0.safetensors",
                          qtype="q8_0").out
    model = santacpu.load(trained)
    prompt, stop = "\n", "\n\n"
    tokens = list(model.generate(model.tokenizer.encode(prompt), max_new_tokens=30))
    k = next(k for k in range(1, len(tokens) + 1) if stop in model.tokenizer.decode(tokens[:k]))
    assert len(tokens) > k  # (the model goes on past it)
    app = build_app(ServerSettings(model_name="trained"), lambda: santacpu.load(trained))
    with in_process(app) as client:
        wait_ready(client.get)
        llama = client.post("/completion", json={"prompt": prompt, "n_predict": 30, "stop": [stop],
                                                 "temperature": 0}).json()
        assert llama["stop_type"] == "word" and llama["tokens_predicted"] == k == llama["timings"]["predicted_n"], llama
        openai = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 30, "stop": [stop],
                                                      "temperature": 0}).json()
        assert openai["choices"][0]["finish_reason"] == "stop" and openai["usage"]["completion_tokens"] == k, openai
        ollama = client.post("/api/generate", json={"model": "m", "prompt": prompt, "stream": False, "raw": True,
                                                    "options": {"num_predict": 30, "stop": [stop], "temperature": 0}}).json()
        assert ollama["done_reason"] == "stop" and ollama["eval_count"] == k, ollama
