"""`santacpu bench`: how fast a model runs on this machine and how much memory it takes.

Owns the measuring logic (the CLI's `bench` command and tools/bench_peers.py call `run_bench`).
Every measurement runs in a child process of its own (`sys.executable -c ...`), one after the
other, so that its peak RSS and its Numba compile state belong to that measurement only:

| part      | child process | what it reports |
|-----------|---------------|-----------------|
| `speed`   | (first, in a child of its own: the model files' read speed, parallel passes over their mapped pages, `santacpu/backends/cpu/read_speed.py`) load (page cache warm), first one-token forward, then `repeat` times: prefill of a P-token prompt, greedy decode of exactly N tokens driven token by token through the engine (EOS does not stop it), time to first token of a ~F-token FIM request through `Model.complete` | load s, first forward s, prefill tok/s, decode tok/s and the weights' GB/s it reads (against the files' read speed), FIM TTFT s (medians), peak RSS of that child |
| `lookup`  | where `Model.generate` has prompt-lookup drafting (`lookup=`): greedy generation of N tokens with and without it, after a prompt whose continuation echoes it (a code chunk, then its first part again) and after a plain code prompt; decode speed from the first token on, tokens compared | tok/s each way, speed-up, drafted/accepted tokens, identical output |
| `memory`  | one `Model.generate` request filling a C-token context (default: the model's whole context); before it, the resident memory of everything but the weights once Numba's runtime is started | peak RSS, the runtime's share |
| `load`    | the model's files dropped from the page cache first (`posix_fadvise(DONTNEED)`: best-effort, the kernel may keep pages), then load and first one-token forward | cold load s, cold first forward s |
| `compile` | twice with `NUMBA_CACHE_DIR` set to one fresh folder: the first run compiles every kernel the model uses, the second loads them from that on-disk cache; each times import, load and one tiny forward (a 16-token prefill, one decode step) and that forward again | seconds each |

Threads: `NUMBA_NUM_THREADS` and the BLAS thread variables are set in each child's environment
and `numba.set_num_threads` is called in it. Prompts are real code: the running Python's standard
library tokenized with the model's tokenizer and cut to the exact length (each repeat starts at a
different token, so no run can reuse another's KV cache), or deterministic ids if no text is found.

May import: anything in `santacpu` but `santacpu.cli` (never `quantize`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

PARTS = ("speed", "lookup", "memory", "load", "compile")
RESULT_MARK = "SANTACPU-BENCH-RESULT "
# Each repeat's prompt starts this many tokens after the previous one's.
REPEAT_STRIDE = 101
# Tokens of the tiny forward timed by the compile runs (>= the backend's BLAS threshold, so that
# both the many-token and the one-token kernels are compiled).
TINY_PREFILL_TOKENS = 16
# The memory run decodes this many tokens after a prompt that fills the rest of the context.
MEMORY_DECODE_TOKENS = 8
# The lengths a full-size model is measured at; shorter where the model's context is (`fit_to_context`).
DEFAULT_PROMPT_TOKENS, DEFAULT_DECODE_TOKENS, DEFAULT_FIM_TOKENS = 512, 128, 1500
# The bound of issue 4 item 6: peak RSS at a 2048-token context within file size + 150 MB.
RSS_BOUND_EXTRA_MB = 150
# The child's code: the import is timed before anything of santacpu is loaded.
_CHILD_CODE = (
    "import sys, time; t0 = time.perf_counter(); from santacpu.bench import child_main; "
    "child_main(sys.argv[1], sys.argv[2], time.perf_counter() - t0)"
)


@dataclass
class BenchSettings:
    model: str  # what santacpu.load accepts: a quantized file, a folder, a weight file, a hub id
    # None: the default (DEFAULT_*_TOKENS), shortened to fit the model's context
    prompt_tokens: int | None = None
    decode_tokens: int | None = None
    fim_tokens: int | None = None  # 0: skip the FIM measurement
    threads: int = 0  # 0: all the cores this process may use
    repeat: int = 3
    memory_context: int = 0  # 0: the model's whole context
    parts: tuple[str, ...] = PARTS
    revision: str | None = None
    extra: dict = field(default_factory=dict)  # passed through to the JSON as given


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# The parent: validate, run the children one at a time, gather one result dictionary.


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict:
    """Measure `settings.model`; returns {"settings", "machine", "model", "results"} (see the
    module docstring for what each part measures). Raises SantacpuError for bad settings."""
    from .errors import SantacpuError

    log = log or (lambda text: print(f"santacpu bench: {text}", file=sys.stderr, flush=True))
    settings.threads = settings.threads or default_threads()
    unknown = [p for p in settings.parts if p not in PARTS]
    if unknown:
        raise SantacpuError(f"unknown bench part '{unknown[0]}' (choose from {', '.join(PARTS)})")
    if settings.threads < 1 or settings.repeat < 1:
        raise SantacpuError("threads and repeat must be at least 1")
    config, weights_type, files = describe_model(settings.model, settings.revision)
    n_ctx = config.n_positions
    fit_to_context(settings, n_ctx, log)
    memory_context = settings.memory_context or n_ctx

    file_bytes = sum(f.stat().st_size for f in files)
    model_facts = {
        "path": str(settings.model),
        "weights_type": weights_type,
        "files": [str(f) for f in files],
        "file_bytes": file_bytes,
        "config": config.to_dict(),
    }
    job = dict(asdict(settings), parts=list(settings.parts), memory_context=memory_context, files=model_facts["files"])
    results: dict = {}
    _read_through(files)  # page cache warm for every run but the cold-load one
    if "speed" in settings.parts:
        log("read speed: parallel passes over the model files' mapped pages")
        results["read_speed"] = {"gb_s": measure_read_speed(files, settings.threads), "bytes": file_bytes}
        log(
            f"speed: {settings.repeat} x (prefill {settings.prompt_tokens}, decode {settings.decode_tokens}"
            + (f", FIM {settings.fim_tokens}" if settings.fim_tokens else "")
            + f" tokens), {settings.threads} threads"
        )
        results["speed"] = _run_child("speed", job)
    if "lookup" in settings.parts:
        log(f"lookup: greedy generation of {settings.decode_tokens} tokens with and without prompt-lookup drafting")
        results["lookup"] = _run_child("lookup", job)
    if "memory" in settings.parts:
        log(f"memory: one request filling a {memory_context}-token context")
        results["memory"] = _run_child("memory", job)
    if "load" in settings.parts:
        log("load: page cache dropped for the model's files (best-effort)")
        results["load"] = _run_child("load", job)
    if "compile" in settings.parts:
        with tempfile.TemporaryDirectory(prefix="santacpu-numba-cache-") as cache:
            log("compile: first run with an empty Numba cache")
            first = _run_child("compile", job, {"NUMBA_CACHE_DIR": cache})
            log("compile: second run with the on-disk cache")
            cached = _run_child("compile", job, {"NUMBA_CACHE_DIR": cache})
        results["compile"] = {"first_run": first, "cached_run": cached}
    return {
        "santacpu_version": _version(),
        "settings": {
            **asdict(settings),
            "parts": list(settings.parts),
            "memory_context": memory_context,
            "statistic": f"median of {settings.repeat}",
        },
        "machine": machine_facts(),
        "model": model_facts,
        "results": results,
        "summary": summarize(results, file_bytes),
    }


def fit_to_context(settings: BenchSettings, n_ctx: int, log: Callable[[str], None]) -> None:
    """Fill in the lengths left to their defaults so that they fit an `n_ctx`-token context (and
    say which were shortened), then check the lengths that the chosen parts use, only those."""
    parts = set(settings.parts)
    prompt, decode, fim = settings.prompt_tokens, settings.decode_tokens, settings.fim_tokens
    shortened = []
    if prompt is None:
        room = n_ctx // 2 if decode is None else n_ctx - decode
        prompt = min(DEFAULT_PROMPT_TOKENS, max(room, 1))
        shortened += [f"a {prompt}-token prompt"] if prompt < DEFAULT_PROMPT_TOKENS else []
    if decode is None:
        room = n_ctx // 4 if settings.prompt_tokens is None else n_ctx - prompt
        decode = min(DEFAULT_DECODE_TOKENS, max(room, 1))
        shortened += [f"{decode} decoded tokens"] if decode < DEFAULT_DECODE_TOKENS else []
    if fim is None:
        fim = min(DEFAULT_FIM_TOKENS, n_ctx * 3 // 4)
        shortened += [f"a {fim}-token FIM prompt"] if fim < DEFAULT_FIM_TOKENS and "speed" in parts else []
    settings.prompt_tokens, settings.decode_tokens, settings.fim_tokens = prompt, decode, fim
    from .errors import SantacpuError

    if parts & {"speed", "lookup"}:
        if min(prompt, decode) < 1:
            raise SantacpuError("prompt tokens and decode tokens must be at least 1")
        if prompt + decode > n_ctx:
            raise SantacpuError(f"{prompt} prompt + {decode} decode tokens exceed the model's {n_ctx}-token context")
    if "speed" in parts and not 0 <= fim < n_ctx:
        raise SantacpuError(f"--fim-tokens must be between 0 and {n_ctx - 1} (the context holds {n_ctx})")
    memory = settings.memory_context
    if "memory" in parts and (not 0 <= memory <= n_ctx or 0 < memory <= MEMORY_DECODE_TOKENS):
        raise SantacpuError(f"the memory context must be between {MEMORY_DECODE_TOKENS + 1} and {n_ctx} tokens")
    if shortened and parts & {"speed", "lookup"}:
        log(f"the model's context holds {n_ctx} tokens: measuring {', '.join(shortened)} (shorter than the defaults)")


def describe_model(model: str, revision: str | None = None):
    """(Config, weights type such as "q8_0" or "f32", the weight files) without loading weights."""
    from .config import Config
    from .errors import SantacpuError
    from .formats.quantized_file import names_quantized_file, read_metadata
    from .loading.source import resolve

    if names_quantized_file(model):
        path = Path(model).expanduser()
        _, meta = read_metadata(path)
        return meta["config"], str(meta["quantization"].get("type", "?")), [path]
    folder = resolve(model, revision)
    config = Config.from_file(folder / "config.json")
    # The loader prefers safetensors over pytorch_model.bin: the files it reads are the ones to time.
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise SantacpuError(f"{folder} holds no weight files (.safetensors or pytorch_model*.bin)")
    return config, _checkpoint_dtype(folder), files


def _checkpoint_dtype(folder: Path) -> str:
    """The type the largest tensor runs in ("f32", "f16"; bf16 is widened to f32), from file headers."""
    from .loading.checkpoint import open_tensors

    source = open_tensors(folder)
    name = max(source.names(), key=lambda n: _product(source.shape(n)))
    dtype = str(source.dtype(name))
    return {"float32": "f32", "float16": "f16"}.get(dtype, dtype)


def _product(shape) -> int:
    result = 1
    for n in shape:
        result *= n
    return result


def _read_through(files: list[Path]) -> None:
    """Read the files once so that the page cache holds them (the process's own RSS stays small:
    one reused buffer)."""
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def measure_read_speed(files: list, threads: int) -> float | None:
    """GB/s of parallel passes over the files' mapped pages (santacpu/backends/cpu/read_speed.py), measured in
    a child process: mapping big files here would raise this process's peak RSS, and with it
    what the operating system reports for every child started afterwards (see peak_rss_mb)."""
    return _run_child("read_speed", {"files": [str(f) for f in files], "threads": threads})["gb_s"]


def _run_child(kind: str, job: dict, env_extra: dict | None = None) -> dict:
    from .errors import SantacpuError

    threads = str(job["threads"])
    env = dict(
        os.environ,
        NUMBA_NUM_THREADS=threads,
        OMP_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        **(env_extra or {}),
    )
    # The child imports this very santacpu, installed or not.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD_CODE, kind, json.dumps(job)],
        check=False,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode or not lines:
        raise SantacpuError(f"the bench's {kind} run failed (exit code {done.returncode}; its messages are above)")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    if "error" in result:
        raise SantacpuError(result["error"])
    return result


# ----------------------------------------------------------------------------------------------
# The children.


def child_main(kind: str, job_json: str, import_s: float) -> None:
    """Entry point of a child process: run one part, print its result as one marked JSON line."""
    import numba

    from .errors import SantacpuError

    job = json.loads(job_json)
    numba.set_num_threads(min(job["threads"], numba.config.NUMBA_NUM_THREADS))
    try:
        children = {
            "speed": _child_speed,
            "lookup": _child_lookup,
            "memory": _child_memory,
            "load": _child_load,
            "compile": _child_compile,
            "read_speed": _child_read_speed,
        }
        result = children[kind](job, import_s)
    except SantacpuError as error:
        result = {"error": str(error)}
    print(RESULT_MARK + json.dumps(result), flush=True)


def _load(job: dict):
    from .model import load

    return load(job["model"], revision=job["revision"])


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

    from .generation.prompts import build_fim_prompt

    model, load_s = _timed(lambda: _load(job))
    engine, n_valid = model.engine, model.n_valid_tokens
    P, N, F, repeat = job["prompt_tokens"], job["decode_tokens"], job["fim_tokens"], job["repeat"]
    longest = max(P, F) + (repeat + 1) * REPEAT_STRIDE
    stream = text_token_stream(model.tokenizer, longest, model.config.vocab_size)
    first_forward_s = _first_forward(model, stream[:1])
    # Warm-up, not timed: both kernel paths (many tokens, one token) run once in this process.
    warm = engine.new_cache(TINY_PREFILL_TOKENS + 1)
    engine.forward(warm, stream[:TINY_PREFILL_TOKENS])
    engine.forward(warm, stream[TINY_PREFILL_TOKENS : TINY_PREFILL_TOKENS + 1])

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
    return {
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


def _child_lookup(job: dict, import_s: float) -> dict:
    import inspect

    model = _load(job)
    if "lookup" not in inspect.signature(model.generate).parameters:
        return {"available": False}
    P, N, repeat = job["prompt_tokens"], job["decode_tokens"], job["repeat"]
    stream = text_token_stream(model.tokenizer, P, model.config.vocab_size)
    chunk = stream[: max(1, 2 * P // 3)]
    prompts = {
        # A model that has learnt to copy continues the repeated chunk where its second copy stops.
        "echo": (chunk + chunk)[:P],
        "plain": stream[:P],
    }
    list(model.generate(stream[:TINY_PREFILL_TOKENS], max_new_tokens=4, lookup=True))  # warm-up, not timed
    result: dict = {"available": True}
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


def _child_memory(job: dict, import_s: float) -> dict:
    import numpy as np

    from .backends.cpu import cpu_kernels

    model = _load(job)
    context = job["memory_context"]
    ids = text_token_stream(model.tokenizer, context, model.config.vocab_size)[: context - MEMORY_DECODE_TOKENS]
    rss_loaded = current_rss_mb()
    # The runtime's own share: start Numba's runtime (LLVM, its runtime library, the on-disk
    # cache) with a tiny kernel that touches no weight, then count everything but the weights.
    row = np.ones((1, 8), np.float32)
    cpu_kernels.layer_norm(row, row[0], row[0], np.float32(1e-5), np.empty_like(row))
    weights_resident = mapped_file_rss_mb(job["files"])
    rss_runtime = None if weights_resident is None else current_rss_mb() - weights_resident
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
    from .backends.cpu.read_speed import read_speed_gb_s

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


# ----------------------------------------------------------------------------------------------
# Prompts, memory and machine facts.


def text_token_stream(tokenizer, n: int, vocab_size: int) -> list[int]:
    """`n` token ids of real code: the standard library's sources in a fixed order, tokenized and
    repeated if short; deterministic random ids if no source text can be read."""
    ids: list[int] = []
    try:
        from .sample_code import stdlib_files

        files = stdlib_files()
    except (ImportError, OSError, KeyError):  # no standard library sources here: fall back below
        files = []
    for path in files:
        try:
            ids += tokenizer.encode(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) >= n:
            return ids[:n]
    if not ids:
        import numpy as np

        return [int(i) for i in np.random.default_rng(0).integers(0, min(vocab_size, 49152), n)]
    return (ids * (n // len(ids) + 1))[:n]


def fim_texts(tokenizer, ids: list[int], n_prompt: int, n_ctx: int) -> tuple[str, str]:
    """(prefix, suffix) texts whose FIM prompt (3 marker tokens included) is close to `n_prompt`
    tokens and fits the context with room for one new token: three quarters before the cursor."""
    from .generation.prompts import build_fim_prompt, fim_budget

    room = min(n_prompt, fim_budget(n_ctx, 1))
    body = n_prompt - 3
    while True:
        cut = body * 3 // 4
        prefix, suffix = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:body])
        excess = len(build_fim_prompt(tokenizer, prefix, suffix, n_ctx * 4, 1)) - room
        if excess <= 0 or body <= 2:
            return prefix, suffix
        body -= excess  # decoding and re-encoding may merge or split a token at the cuts


def decode_weight_bytes(weights) -> int:
    """Bytes of weights one decode step reads: every layer's four matrices and the LM head (the
    embedding tables give one row each, the small vectors are left out)."""
    matrices = [weights.wte]
    for layer in weights.layers:
        matrices += [layer.attn_c_attn_weight, layer.attn_c_proj_weight, layer.mlp_c_fc_weight, layer.mlp_c_proj_weight]
    return sum(int(m.nbytes) for m in matrices)


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (clean pages only; best-effort)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (10^6 bytes, like the file sizes).

    Linux's VmHWM where there is one: getrusage's ru_maxrss also counts what the parent held when
    it started this process (Python starts children with vfork, and exec hands the shared memory's
    peak to the child's maximum), so a parent that once mapped a big file inflated every child."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1e6 if sys.platform == "darwin" else maxrss * 1024 / 1e6  # bytes there, KiB elsewhere


def current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float | None:
    """A memory field of Linux's /proc/self/status (reported in KiB) in MB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def mapped_file_rss_mb(paths: list[str]) -> float | None:
    """Resident MB of this process's memory mappings of `paths` (Linux's /proc/self/smaps;
    None where that is missing)."""
    wanted = {os.path.realpath(p) for p in paths}
    total_kib, counting = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                    counting = len(fields) >= 6 and os.path.realpath(fields[5]) in wanted
                elif counting and fields[0] == "Rss:":
                    total_kib += int(fields[1])
    except OSError:
        return None
    return total_kib * 1024 / 1e6


def machine_facts() -> dict:
    import numba
    import numpy as np

    from .backends.cpu import int_dot

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            memory_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": default_threads(),
        "simd": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
        "integer_kernels": int_dot.ISA if int_dot.ENABLED else None,  # santacpu/backends/cpu/int_dot.py's choice
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------------------------
# Reporting.


def summarize(results: dict, file_bytes: int) -> dict:
    """The headline figures, flat: what tools/bench_peers.py compares."""
    speed, memory, load, compile_ = (results.get(k, {}) for k in ("speed", "memory", "load", "compile"))
    summary = {
        "load_warm_s": speed.get("load_s"),
        "load_cold_s": load.get("load_s"),
        "first_forward_warm_s": speed.get("first_forward_s"),
        "first_forward_cold_s": load.get("first_forward_s"),
        "prefill_tok_s": speed.get("prefill_tok_s"),
        "decode_tok_s": speed.get("decode_tok_s"),
        "decode_gb_s": (
            speed["decode_tok_s"] * speed["decode_weight_bytes"] / 1e9 if speed.get("decode_weight_bytes") else None
        ),
        "read_speed_gb_s": results.get("read_speed", {}).get("gb_s"),
        "fim_ttft_s": speed.get("fim_ttft_s"),
        "compile_first_run_s": compile_.get("first_run", {}).get("total_s"),
        "compile_cached_run_s": compile_.get("cached_run", {}).get("total_s"),
        "peak_rss_mb": memory.get("peak_rss_mb"),
        "rss_runtime_mb": memory.get("rss_runtime_mb"),
        "peak_rss_speed_run_mb": speed.get("peak_rss_mb"),
        "file_mb": file_bytes / 1e6,
    }
    lookup = results.get("lookup", {})
    for case in ("echo", "plain"):
        if case in lookup:
            summary[f"lookup_{case}_speedup"] = lookup[case]["speedup"]
            summary[f"lookup_{case}_identical"] = lookup[case]["identical_output"]
    if memory:
        summary["rss_bound_mb"] = file_bytes / 1e6 + RSS_BOUND_EXTRA_MB
    return summary


def format_table(report: dict) -> str:
    """The readable table `santacpu bench` prints."""
    s, m, settings, results = report["summary"], report["model"], report["settings"], report["results"]
    machine = report["machine"]
    lines = [
        f"model    {m['path']} ({m['weights_type']}, {m['file_bytes'] / 1e6:.0f} MB)",
        (
            f"machine  {machine['cpu']}, {machine['usable_cores']} cores usable; integer kernels "
            f"{machine.get('integer_kernels') or 'off'}; santacpu {report['santacpu_version']}; "
            f"{settings['threads']} threads; speeds are the {settings['statistic']} runs"
        ),
        "",
    ]

    def row(what: str, value: str, note: str = "") -> None:
        lines.append(f"  {what:<52}{value:>14}  {note}".rstrip())

    if "speed" in results:
        speed = results["speed"]
        row(f"prefill, {settings['prompt_tokens']}-token prompt", f"{s['prefill_tok_s']:.1f} tok/s")
        row(f"decode, {speed['decode_tokens_done']} tokens (greedy)", f"{s['decode_tok_s']:.2f} tok/s")
        if s.get("decode_gb_s") is not None:
            note = f"{speed['decode_weight_bytes'] / 1e6:.0f} MB of weights a token"
            if s.get("read_speed_gb_s"):
                note += (
                    f"; this file's pages read at {s['read_speed_gb_s']:.1f} GB/s "
                    f"({100 * s['decode_gb_s'] / s['read_speed_gb_s']:.0f}% of it)"
                )
            row("decode, weights read", f"{s['decode_gb_s']:.1f} GB/s", note)
        if s["fim_ttft_s"] is not None:
            row(f"FIM time to first token, {speed['fim_prompt_tokens']}-token prompt", f"{s['fim_ttft_s']:.3f} s")
        row("load, warm page cache", f"{s['load_warm_s']:.2f} s", f"first forward {s['first_forward_warm_s']:.2f} s")
    if "lookup" in results:
        lookup = results["lookup"]
        if not lookup.get("available"):
            row("prompt-lookup decoding", "n/a", "this santacpu's generate has no lookup option")
        for case, label in (("echo", "echoing prompt"), ("plain", "plain code prompt")):
            if case in lookup:
                c = lookup[case]
                accepted = f"{c['accepted_tokens']}/{c['drafted_tokens']} drafted tokens accepted"
                same = "identical output" if c["identical_output"] else "OUTPUT DIFFERS"
                speedup = f"{c['speedup']:.2f}x" if c["speedup"] else "n/a"
                row(
                    f"prompt lookup vs plain decode, {label}",
                    speedup,
                    f"{_number(c['lookup_tok_s'])} vs {_number(c['plain_tok_s'])} tok/s; {accepted}; {same}",
                )
    if "load" in results:
        row(
            "load, cold page cache (best-effort drop)",
            f"{s['load_cold_s']:.2f} s",
            f"first forward {s['first_forward_cold_s']:.2f} s (reads the weights from disk)",
        )
    if "compile" in results:
        for key, label in (("first_run", "Numba, first run (compiles)"), ("cached_run", "Numba, on-disk cache")):
            c = results["compile"][key]
            row(
                label,
                f"{c['total_s']:.2f} s",
                f"import {c['import_s']:.2f} + load {c['load_s']:.2f} + tiny forward "
                f"{c['tiny_forward_s']:.2f} (again: {c['tiny_forward_again_s']:.3f})",
            )
    if "memory" in results:
        mem = results["memory"]
        over = s["peak_rss_mb"] - s["file_mb"]
        row(
            f"peak RSS, {mem['context_tokens']}-token context",
            f"{s['peak_rss_mb']:.0f} MB",
            f"file {s['file_mb']:.0f} MB {over:+.0f} (bound +{RSS_BOUND_EXTRA_MB}: "
            f"{'within' if over <= RSS_BOUND_EXTRA_MB else 'over'})",
        )
        if s.get("rss_runtime_mb") is not None:
            runtime = s["rss_runtime_mb"]
            row("  of which the runtime, before the model runs", f"{runtime:.0f} MB",
                "all but the mapped weights: Python, NumPy, Numba with LLVM's code, the tokenizer, "
                "tensors converted at load")
            work = over - runtime  # a model much smaller than the runtime's noise can come out negative
            row("  of which the model's work above the file", f"{work:+.0f} MB" if work >= 1 else "under 1 MB",
                "KV cache, activations, kernel buffers")
    if "speed" in results:
        row("peak RSS, speed run", f"{s['peak_rss_speed_run_mb']:.0f} MB")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
