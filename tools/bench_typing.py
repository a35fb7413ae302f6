"""Prompt reuse while typing: what one more character at the cursor costs, SPM beside PSM; and a
typing trace replayed over HTTP against `santacpu serve` and llama.cpp's `llama-server`.

    python -m tools.bench_typing MODEL [--source FILE] [--typed "    x"] [--fit-only]
    python -m tools.bench_typing MODEL --trace --gguf FILE.gguf [--llamacpp-bin DIR] [--line N]
    python -m tools.bench_typing MODEL --trace --dialects infill,ollama,openai-codellama

For a source file cut mid-way (the cursor), runs a fresh FIM request, then the same request with
`--typed` appended to the prefix, and prints for each FIM order: prompt tokens, time to first token
of the fresh request and of the keystroke, and how many prompt tokens the keystroke reused and
computed (`Model.last_stats`). Two files: one that fits the context, and (unless --fit-only) one
longer than it, which `build_fim_prompt` trims at its far ends.
(`santacpu bench` measures prompt-lookup decoding and the fresh FIM time to first token.)
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import santacpu
from santacpu.generation.prompts import build_fim_prompt

NEW_TOKENS = 4


def keystroke(model, prefix: str, suffix: str, order: str, typed: str) -> str:
    n_ctx = model.config.n_positions
    model.clear_prompt_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long file's trimming warning
        before = build_fim_prompt(model.tokenizer, prefix, suffix, n_ctx, NEW_TOKENS, order=order)
        after = build_fim_prompt(model.tokenizer, prefix + typed, suffix, n_ctx, NEW_TOKENS, order=order)
    list(model.generate(before, max_new_tokens=NEW_TOKENS))
    fresh = model.last_stats.time_to_first_token
    list(model.generate(after, max_new_tokens=NEW_TOKENS))
    s = model.last_stats
    return (f"{order}: prompt {len(after)} tokens, fresh TTFT {fresh:.2f} s; keystroke: {s.computed_tokens} "
            f"computed, {s.reused_tokens} reused, TTFT {s.time_to_first_token:.2f} s")


# --- the HTTP trace: llama.vim's requests, one a keystroke -------------------------------------
# A line of --source typed character by character; each keystroke sends llama.vim's /infill body
# (autoload/llama.vim: 256 lines before the cursor line as input_prefix, the typed part of the
# line as prompt, the rest of the line and 64 lines after as input_suffix), non-streaming, and the
# time to the finished completion is taken. The first request is the cold one. `--dialects` sends
# the same keystrokes through santacpu serve's other dialects too: Ollama's /api/generate (prompt +
# suffix, as Continue sends them) and OpenAI's /v1/completions with a CodeLlama-template prompt (as a
# client configured for CodeLlama writes it), each on a fresh server.
N_PREFIX_LINES, N_SUFFIX_LINES, TRACE_PREDICT = 256, 64, 8
DIALECTS = ("infill", "ollama", "openai-codellama")


def trace_requests(source: str, line: int) -> list[dict]:
    lines = source.split("\n")
    typed = lines[line]
    prefix = "\n".join(lines[max(0, line - N_PREFIX_LINES) : line]) + "\n"
    after = "\n".join(lines[line + 1 : line + 1 + N_SUFFIX_LINES]) + "\n"
    return [
        {
            "id_slot": 0, "input_prefix": prefix, "input_suffix": "\n" + after, "input_extra": [],
            "prompt": typed[:k], "n_predict": TRACE_PREDICT, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
        }
        for k in range(len(typed) + 1)
    ]


def in_dialect(body: dict, dialect: str) -> tuple[str, dict]:
    """(path, body) of a llama.vim /infill body said in another dialect of santacpu serve."""
    prefix, suffix = body["input_prefix"] + body["prompt"], body["input_suffix"]
    if dialect == "infill":
        return "/infill", body
    if dialect == "ollama":
        options = {"num_predict": TRACE_PREDICT, "top_k": body["top_k"], "top_p": body["top_p"]}
        return "/api/generate", {"model": "santacoder", "prompt": prefix, "suffix": suffix, "stream": False, "options": options}
    if dialect == "openai-codellama":
        prompt = f"<PRE> {prefix} <SUF>{suffix} <MID>"
        return "/v1/completions", {"model": "santacoder", "prompt": prompt, "max_tokens": TRACE_PREDICT, "top_p": body["top_p"]}
    raise SystemExit(f"unknown dialect {dialect!r} (choose from {', '.join(DIALECTS)})")


def computed_tokens(reply: dict):
    """Prompt tokens the request computed, where the dialect reports it."""
    if "timings" in reply:
        return reply["timings"].get("prompt_n")
    return reply.get("prompt_eval_count")  # Ollama's: the tokens evaluated, a reused prefix not counted


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], url: str, env: dict):
    import subprocess
    import time

    import httpx

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited: {process.stderr.read()[-500:]}")
        time.sleep(0.25)
    process.kill()
    raise SystemExit(f"{command[0]} never became ready")


def replay(url: str, requests: list[dict], dialect: str = "infill") -> list[dict]:
    import time

    import httpx

    results = []
    for body in requests:
        path, sent = in_dialect(body, dialect)
        started = time.perf_counter()
        reply = httpx.post(url + path, json=sent, timeout=600)
        reply.raise_for_status()
        results.append({"seconds": time.perf_counter() - started, "prompt_n": computed_tokens(reply.json())})
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_trace(args) -> None:
    import os
    import sys

    source = Path(args.source).read_text(encoding="utf-8")
    line = args.line if args.line is not None else len(source.split("\n")) // 2
    while not source.split("\n")[line].strip():
        line += 1
    requests = trace_requests(source, line)
    env_threads = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads))
    systems = {}
    for dialect in args.dialects.split(","):
        port = free_port()
        shown = "" if dialect == "infill" else f", {in_dialect(requests[0], dialect)[0]} {dialect.removeprefix('openai-')}"
        name = f"santacpu serve ({args.fim_order}{shown})"
        systems[name + (", again" if name in systems else "")] = (
            [sys.executable, "-m", "santacpu", "serve", "--model", args.model, "--port", str(port), "--fim-order",
             args.fim_order, "--fim-budget", str(args.fim_budget)],
            f"http://127.0.0.1:{port}",
            dialect,
        )
    if args.gguf:
        port = free_port()
        systems["llama-server"] = (
            [str(Path(args.llamacpp_bin) / "llama-server"), "-m", args.gguf, "-c", "2048", "-b", "1024", "-t",
             str(args.threads), "-np", "1", "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}",
            "infill",
        )
    print(f"trace: line {line + 1} of {args.source} typed ({len(requests) - 1} keystrokes), "
          f"{TRACE_PREDICT} tokens predicted, {args.threads} threads, FIM prompts of at most {args.fim_budget} tokens")
    print("| server | cold s | keystroke p50 s | keystroke p95 s | prompt tokens computed a keystroke (median) |")
    print("|---|---|---|---|---|")
    for name, (command, url, dialect) in systems.items():
        process = start_server(command, url, env_threads)
        try:
            results = replay(url, requests, dialect)
        finally:
            process.terminate()
            process.wait(timeout=60)
        keystrokes = results[1:]
        seconds = [r["seconds"] for r in keystrokes]
        computed = sorted(r["prompt_n"] for r in keystrokes if r["prompt_n"] is not None)
        print(f"| {name} | {results[0]['seconds']:.2f} | {percentile(seconds, 0.5):.2f} | {percentile(seconds, 0.95):.2f} | "
              f"{computed[len(computed) // 2] if computed else '-'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--trace", action="store_true", help="Replay a typing trace over HTTP (see run_trace).")
    parser.add_argument("--gguf", help="--trace: also replay it against llama-server on this GGUF file.")
    parser.add_argument("--llamacpp-bin", default="/opt/llamacpp/src/build/bin")
    parser.add_argument("--line", type=int, help="--trace: the (0-based) line typed; default: the middle one.")
    parser.add_argument("--fim-order", default="spm", help="--trace: santacpu serve's --fim-order.")
    parser.add_argument(
        "--dialects", default="infill", help=f"--trace: santacpu serve's dialects to replay through, comma-separated ({', '.join(DIALECTS)})."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fim-budget", type=int, default=1024, help="--trace: santacpu serve's --fim-budget (llama-server: its -b 1024)"
    )
    parser.add_argument("--source", default=str(Path(argparse.__file__)), help="A long source file (UTF-8).")
    parser.add_argument("--typed", default="    x", help="Text typed at the cursor.")
    parser.add_argument("--fit-only", action="store_true", help="Skip the file longer than the context.")
    args = parser.parse_args()
    if args.trace:
        run_trace(args)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = santacpu.load(args.model)
    tok, n_ctx = model.tokenizer, model.config.n_positions
    ids = tok.encode(Path(args.source).read_text(encoding="utf-8"))
    list(model.generate(ids[:16], max_new_tokens=4))  # kernels compiled or loaded: not timed below
    files = {"fits the context": tok.decode(ids[: (n_ctx - 16) * 3 // 4])}
    if not args.fit_only:
        files["longer than the context"] = tok.decode(ids[: 2 * n_ctx])
    for name, text in files.items():
        cut = text.index("\n", len(text) // 2) + 1
        print(f"{len(tok.encode(text))}-token file ({name}), {args.typed!r} typed at the cursor:")
        for order in ("spm", "psm"):
            print("  " + keystroke(model, text[:cut], text[cut:], order, args.typed))


if __name__ == "__main__":
    main()
