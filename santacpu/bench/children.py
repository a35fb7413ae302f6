"""The bench's child processes: `child_main` runs one part (speed, lookup, memory, load, compile,
read speed) in a process of its own and prints its result as one marked JSON line.

May import: the other `santacpu.bench` modules, and lazily `santacpu.model`, `santacpu.generation`,
`santacpu.backends.cpu`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from .machine import current_rss_mb, drop_page_cache, mapped_file_rss_mb, peak_rss_mb
from .run import (
    BATCH_DECODE_TOKENS,
    BATCH_PROMPT_TOKENS,
    MEMORY_DECODE_TOKENS,
    REPEAT_STRIDE,
    RESULT_MARK,
    TINY_PREFILL_TOKENS,
)
from .workload import decode_weight_bytes, fim_texts, text_token_stream


def child_main(kind: str, job_json: str, import_s: float) -> None:
    """Entry point of a child process: run one part, print its result as one marked JSON line."""
    import numba

    from ..errors import SantacpuError, warning_line

    job = json.loads(job_json)
    numba.set_num_threads(min(job["threads"], numba.config.NUMBA_NUM_THREADS))
    children = {
        "speed": _child_speed,
        "lookup": _child_lookup,
        "memory": _child_memory,
        "load": _child_load,
        "compile": _child_compile,
        "read_speed": _child_read_speed,
        "batch": _child_batch,
    }
    # Warnings go back with the result as santacpu's lines: the parent says each once, however
    # many children met it (every child loads the model).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            result = children[kind](job, import_s)
        except SantacpuError as error:
            result = {"error": str(error)}
        except MemoryError:
            result = {"error": f"the bench's {kind} run ran out of memory (lower --batch, --repeat or the token counts)"}
    lines = list(dict.fromkeys(warning_line(w.message, w.category, w.filename) for w in caught))
    print(RESULT_MARK + json.dumps({**result, "warnings_said": lines}), flush=True)


def _load(job: dict):
    from ..model import load, quant_as_it_is

    return load(job["model"], revision=job["revision"], quant=quant_as_it_is(job["model"]), device=job.get("device", "auto"))


def _timed(work: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = work()
    return value, time.perf_counter() - start


def _first_forward(model, ids: list[int]) -> float:
    engine = model.engine
    cache = engine.new_cache(len(ids))
    return _timed(lambda: engine.forward(cache, ids))[1]


def _child_speed(job: dict, import_s: float) -> dict:
    import numpy as np

    from ..generation.prompts import build_fim_prompt

    model, load_s = _timed(lambda: _load(job))
    engine, n_valid = model.engine, model.n_valid_tokens
    P, N, F, repeat = job["prompt_tokens"], job["decode_tokens"], job["fim_tokens"], job["repeat"]
    longest = max(P, F) + (repeat + 1) * REPEAT_STRIDE
    stream = text_token_stream(model.tokenizer, longest, model.config.vocab_size)
    first_forward_s = _first_forward(model, stream[:1])
    # Warm-up, not timed: the timed prompt's kernel path and the one-token path run once in this
    # process (a shorter prompt can take another path: its first timed run was mostly compiling).
    n = min(P, model.config.n_positions - 1)
    warm = engine.new_cache(n + 1)
    engine.forward(warm, stream[:n])
    engine.forward(warm, stream[n : n + 1])

    prefill, decode, fim, fim_prompt_tokens, decoded = [], [], [], 0, 0
    for r in range(repeat):
        ids = stream[(r + 1) * REPEAT_STRIDE :][:P]
        cache = engine.new_cache(P + N)
        start = time.perf_counter()
        logits = engine.forward(cache, ids)[-1]
        prefill.append(P / (time.perf_counter() - start))
        start, decoded = time.perf_counter(), 0
        for _ in range(N):  # greedy, EOS included: exactly N tokens
            token = int(np.argmax(logits[:n_valid]))
            logits = engine.forward(cache, [token])[-1]
            decoded += 1
        decode.append(decoded / (time.perf_counter() - start))
        if F:
            prefix, suffix = fim_texts(model.tokenizer, stream[(r + 1) * REPEAT_STRIDE :], F, model.config.n_positions)
            fim_prompt_tokens = len(build_fim_prompt(model.tokenizer, prefix, suffix, model.config.n_positions, 1))
            start = time.perf_counter()
            model.complete(prefix, suffix, max_new_tokens=1)
            fim.append(time.perf_counter() - start)
    figures = {"device": model.device}
    if model.engine.backend.name == "cuda":
        try:
            figures["cuda"] = _cuda_figures(model, stream[:P], stream[P])
        except Exception as error:  # the speeds above stand on their own
            figures["cuda"] = {"error": f"{type(error).__name__}: {error}"}
    return {
        **figures,
        "import_s": import_s,
        "load_s": load_s,
        "decode_weight_bytes": decode_weight_bytes(model.weights),
        "first_forward_s": first_forward_s,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "decode_tokens_done": decoded,
        "fim_ttft_s": statistics.median(fim) if fim else None,
        "fim_prompt_tokens": fim_prompt_tokens or None,
        "samples": {"prefill_tok_s": prefill, "decode_tok_s": decode, "fim_ttft_s": fim},
        "peak_rss_mb": peak_rss_mb(),
    }


def _cuda_figures(model, prompt: list[int], token: int, steps: int = 32) -> dict:
    """On a GPU: one decode step at the end of `prompt` taken apart (wall time against the time
    the kernels ran, by device events: the rest is the host's launch overhead), each kernel's
    time and achieved GB/s, the device memory, and the copy kernel's bandwidth (the bound)."""
    engine, backend = model.engine, model.engine.backend
    cache = engine.new_cache(len(prompt) + 1)
    engine.forward(cache, prompt)
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.forward(cache, [token])
        walls.append(time.perf_counter() - start)
        cache.truncate(len(prompt))
    fast_before = backend.fast_launches
    timings = backend.profile(lambda: engine.forward(cache, [token]))
    fast = backend.fast_launches - fast_before
    cache.truncate(0)
    prefill = backend.profile(lambda: engine.forward(cache, prompt))
    full = engine.new_cache(model.config.n_positions)
    return {
        "decode_step_ms": 1e3 * statistics.median(walls),
        "kernel_ms": sum(ms for _, _, ms in timings),
        "launches": len(timings),
        "prepared_launches": fast,
        "kernels": _by_kernel(timings),
        "prefill_kernel_ms": sum(ms for _, _, ms in prefill),
        "prefill_kernels": _by_kernel(prefill),
        "weight_bytes": backend.weight_bytes,
        "kv_bytes_full_context": full.nbytes,
        "device_memory_used_bytes": backend.memory_used(),
        "copy_gb_s": backend.copy_bandwidth(),
    }


def _by_kernel(timings: list[tuple[str, int, float]]) -> dict[str, dict]:
    """Launches, milliseconds, bytes of weights read and GB/s, summed by kernel label."""
    kernels: dict[str, dict] = {}
    for label, nbytes, ms in timings:
        k = kernels.setdefault(label, {"launches": 0, "ms": 0.0, "bytes": 0})
        k["launches"] += 1
        k["ms"] += ms
        k["bytes"] += nbytes
    for k in kernels.values():
        k["gb_s"] = k["bytes"] / (k["ms"] / 1e3) / 1e9 if k["bytes"] and k["ms"] > 0 else None
    return kernels


def _child_batch(job: dict, import_s: float) -> dict:
    """Aggregate decode speed of B sequences at once (continuous batching), for each B: every
    sequence joins in the first step (its prompt computed on its own), then the later steps are
    timed: each one batched forward over all the running sequences."""
    model = _load(job)
    P, N, sizes = BATCH_PROMPT_TOKENS, BATCH_DECODE_TOKENS, job["batch"]
    P = min(P, model.config.n_positions // 2)
    N = min(N, model.config.n_positions - P)
    stream = text_token_stream(model.tokenizer, P * max(sizes) + P, model.config.vocab_size)

    def run(B: int) -> dict:
        scheduler = model.scheduler(max_batch=B)
        for b in range(B):
            scheduler.submit(stream[b * P : (b + 1) * P], max_new_tokens=N, lookup=False)
        start = time.perf_counter()
        scheduler.step()  # every prompt, then the first batched step
        joined = time.perf_counter()
        tokens = 0
        while scheduler.pending:
            tokens += sum(len(emitted) for _, emitted in scheduler.step())
        elapsed = time.perf_counter() - joined
        return {"prompts_s": joined - start, "decode_tok_s": tokens / elapsed if elapsed else None, "tokens": tokens}

    run(2)  # warm-up, not timed: the kernels for a few tokens at once
    result = {"prompt_tokens": P, "decode_tokens": N, "sizes": {}}
    for B in sizes:
        runs = [run(B) for _ in range(job["repeat"])]
        aggregate = statistics.median(r["decode_tok_s"] for r in runs)
        result["sizes"][str(B)] = {
            "aggregate_tok_s": aggregate,
            "per_sequence_tok_s": aggregate / B,
            "prompts_s": statistics.median(r["prompts_s"] for r in runs),
            "samples": [r["decode_tok_s"] for r in runs],
            "peak_rss_mb": peak_rss_mb(),
        }
    return result


def _child_lookup(job: dict, import_s: float) -> dict:
    model = _load(job)
    P, N, repeat = job["prompt_tokens"], job["decode_tokens"], job["repeat"]
    stream = text_token_stream(model.tokenizer, P, model.config.vocab_size)
    chunk = stream[: max(1, 2 * P // 3)]
    prompts = {
        # A model that has learnt to copy continues the repeated chunk where its second copy stops.
        "echo": (chunk + chunk)[:P],
        "plain": stream[:P],
    }
    list(model.generate(stream[:TINY_PREFILL_TOKENS], max_new_tokens=4, lookup=True))  # warm-up, not timed
    result: dict = {}
    for case, ids in prompts.items():
        runs: dict[str, list[float]] = {"plain_tok_s": [], "lookup_tok_s": []}
        outputs, stats = {}, None
        for _ in range(repeat):
            for use_lookup in (False, True):
                tokens, first = [], None
                for token in model.generate(ids, max_new_tokens=N, lookup=use_lookup):
                    tokens.append(token)
                    first = first or time.perf_counter()
                end = time.perf_counter()
                speed = (len(tokens) - 1) / (end - first) if len(tokens) > 1 else None
                runs["lookup_tok_s" if use_lookup else "plain_tok_s"].append(speed)
                outputs[use_lookup] = tokens
                if use_lookup:
                    stats = getattr(model, "last_stats", None)
        plain = statistics.median(runs["plain_tok_s"]) if None not in runs["plain_tok_s"] else None
        drafted = getattr(stats, "drafted_tokens", None)
        result[case] = {
            "prompt_tokens": len(ids),
            "generated_tokens": len(outputs[True]),
            "identical_output": outputs[True] == outputs[False],
            "plain_tok_s": plain,
            "lookup_tok_s": statistics.median(runs["lookup_tok_s"]) if None not in runs["lookup_tok_s"] else None,
            "drafted_tokens": drafted,
            "accepted_tokens": getattr(stats, "accepted_tokens", None),
            "decode_passes": getattr(stats, "decode_passes", None),
            "samples": runs,
        }
        lookup = result[case]["lookup_tok_s"]
        result[case]["speedup"] = lookup / plain if lookup and plain else None
    return result


def copied_weights_mb(model) -> float:
    """MB of the weights the backend copied out of the file mapping at load (row groups and the
    layers' vectors on CPUs with integer kernels, backends/cpu/repack.py): they stand in for released pages."""
    import numpy as np

    loaded, prepared = model.weights, model.engine.weights
    vectors = [(loaded.ln_f_weight, prepared.ln_f_weight), (loaded.ln_f_bias, prepared.ln_f_bias)]
    matrices = [prepared.wte]
    for before, after in zip(loaded.layers, prepared.layers):
        for f in dataclasses.fields(before):
            if len(getattr(before, f.name).shape) == 2:
                matrices.append(getattr(after, f.name))
            else:
                vectors.append((getattr(before, f.name), getattr(after, f.name)))
    copied = sum(getattr(m, "copied_nbytes", 0) for m in matrices)  # a prepared linear's own copy
    copied += sum(after.nbytes for before, after in vectors if after is not before and isinstance(after, np.ndarray))
    return copied / 1e6


def runtime_rss_mb(files: list, model) -> float | None:
    """The runtime's own share of this process's RSS, for `model`, loaded from `files`, that has not
    run yet: start Numba's runtime (LLVM, its runtime library, the on-disk cache) with a tiny kernel
    that touches no weight, then count everything but the weights' resident pages and the
    backend's copies of weights (None where /proc cannot say)."""
    import numpy as np

    from ..backends.cpu import cpu_kernels

    row = np.ones((1, 8), np.float32)
    cpu_kernels.layer_norm(row, row[0], row[0], np.float32(1e-5), np.empty_like(row))
    weights_resident = mapped_file_rss_mb(files)
    if weights_resident is None:
        return None
    return current_rss_mb() - weights_resident - copied_weights_mb(model)


def _child_memory(job: dict, import_s: float) -> dict:
    model = _load(job)
    context = job["memory_context"]
    ids = text_token_stream(model.tokenizer, context, model.config.vocab_size)[: context - MEMORY_DECODE_TOKENS]
    rss_loaded = current_rss_mb()
    rss_runtime = runtime_rss_mb(job["files"], model)
    produced = sum(1 for _ in model.generate(ids, max_new_tokens=MEMORY_DECODE_TOKENS))
    return {
        "context_tokens": context,
        "prompt_tokens": len(ids),
        "decoded_tokens": produced,
        "rss_after_load_mb": rss_loaded,
        "rss_runtime_mb": rss_runtime,
        "peak_rss_mb": peak_rss_mb(),
    }


def _child_read_speed(job: dict, import_s: float) -> dict:
    from ..backends.cpu.read_speed import read_speed_gb_s

    return {"gb_s": read_speed_gb_s(job["files"], job["threads"])}


def _child_load(job: dict, import_s: float) -> dict:
    dropped = [drop_page_cache(Path(f)) for f in job["files"]]
    model, load_s = _timed(lambda: _load(job))
    return {"load_s": load_s, "first_forward_s": _first_forward(model, [0]), "pages_dropped": all(dropped)}


def _child_compile(job: dict, import_s: float) -> dict:
    model, load_s = _timed(lambda: _load(job))
    n = min(TINY_PREFILL_TOKENS, model.config.n_positions - 1)
    ids = list(range(1, n + 1))

    def tiny_forward():
        engine = model.engine
        cache = engine.new_cache(n + 1)
        logits = engine.forward(cache, ids)
        engine.forward(cache, [int(logits[-1].argmax())])

    forward_s = _timed(tiny_forward)[1]
    again_s = _timed(tiny_forward)[1]
    return {
        "import_s": import_s,
        "load_s": load_s,
        "tiny_forward_s": forward_s,
        "tiny_forward_again_s": again_s,
        "total_s": import_s + load_s + forward_s,
    }
