"""The bench's parent process: settings, the lengths fitted to the model's context, the model's
facts without loading it, and each part run in a child process of its own, one at a time (see
the package docstring for what each part measures); the one result dictionary.

May import: the other `santacpu.bench` modules (machine, report), `santacpu.atomic_file` (its
temporary Numba cache), `santacpu.signals`, and lazily `santacpu` below the API (config, errors, paths, formats, loading).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic_file import owned_temp_folder
from .machine import default_threads, machine_facts, santacpu_version
from .report import short_run_warnings, summarize
from ..paths import user_path
from ..signals import signals_held

PARTS = ("speed", "lookup", "memory", "load", "compile")
# `--batch`: B sequences of BATCH_PROMPT_TOKENS distinct prompt tokens each, greedy, generating
# BATCH_DECODE_TOKENS tokens each (llama-batched-bench's -npp 64 -ntg 32, for comparison).
BATCH_PROMPT_TOKENS, BATCH_DECODE_TOKENS = 64, 32
RESULT_MARK = "SANTACPU-BENCH-RESULT "
# Each repeat's prompt starts this many tokens after the previous one's.
REPEAT_STRIDE = 101
# Tokens of the tiny forward timed by the compile runs: past the CPU backend's BLAS threshold
# (kernels.BLAS_MIN_TOKENS, 32: a test holds it), so that the many-token and the one-token kernels
# are both compiled.
TINY_PREFILL_TOKENS = 40
# The shortest FIM prompt timed: its 3 marker tokens and one of text.
MIN_FIM_TOKENS = 4
# Most runs of each speed measurement, and the largest batch size (the server's --max-batch's).
MAX_REPEAT, MAX_BATCH_SIZE = 1000, 256
# The memory run decodes this many tokens after a prompt that fills the rest of the context.
MEMORY_DECODE_TOKENS = 8
# The lengths a full-size model is measured at; shorter where the model's context is (`fit_to_context`).
DEFAULT_PROMPT_TOKENS, DEFAULT_DECODE_TOKENS, DEFAULT_FIM_TOKENS = 512, 128, 1500
# The child's code: it first unblocks the signals its start held (`signals_held`:
# a child inherits its parent's mask); then its import is timed from before anything of santacpu is
# loaded through the runtime (santacpu.model: NumPy, Numba, the kernels' modules), as a user's
# process pays it.
_CHILD_CODE = (
    "import signal, sys, time; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
    "t0 = time.perf_counter(); import santacpu.model; from santacpu.bench import child_main; "
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
    quant: str | None = None  # a full-precision model is benched as santacpu.load runs it (None: q8_0; "none")
    batch: tuple[int, ...] = ()  # batch sizes for the batched-decode part; () skips it
    device: str = "auto"  # what santacpu.load accepts: auto, cpu, cuda
    name: str | None = None  # the model as its user named it, where `model` is what that runs as
    extra: dict = field(default_factory=dict)  # passed through to the JSON as given

    def checked(self) -> BenchSettings:
        """These settings with duplicate parts and batch sizes dropped, or an OptionValueError (a
        usage error) for what no model makes right: the lengths are `fit_to_context`'s."""
        from ..errors import OptionValueError

        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise OptionValueError(f"unknown bench part '{unknown[0]}' (choose from {', '.join(PARTS)})")
        if self.threads < 0 or not 1 <= self.repeat <= MAX_REPEAT:
            raise OptionValueError(f"threads must be at least 0 (all cores) and repeat from 1 to {MAX_REPEAT}")
        if any(not 1 <= size <= MAX_BATCH_SIZE for size in self.batch):
            raise OptionValueError(f"--batch sizes must be from 1 to {MAX_BATCH_SIZE}")
        self.parts, self.batch = tuple(dict.fromkeys(self.parts)), tuple(dict.fromkeys(self.batch))
        return self


# ----------------------------------------------------------------------------------------------
# The parent: validate, run the children one at a time, gather one result dictionary.


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict:
    """Measure `settings.model`; returns {"settings", "machine", "model", "results"} (see the
    module docstring for what each part measures). Raises SantacpuError for bad settings."""
    from ..model import resolve_device, runnable_model

    log = log or (lambda text: print(f"santacpu bench: {text}", file=sys.stderr, flush=True))
    settings = settings.checked()
    settings.threads = settings.threads or default_threads()
    resolve_device(settings.device)
    asked = settings.name or settings.model
    settings.model, settings.revision = runnable_model(settings.model, settings.revision, settings.quant)
    config, weights_type, files = describe_model(settings.model, settings.revision)
    n_ctx = config.n_positions
    fit_to_context(settings, n_ctx, log)
    memory_context = settings.memory_context or n_ctx

    file_bytes = sum(f.stat().st_size for f in files)
    model_facts = {
        "name": asked,  # as given (a folder or hub id runs as its cached quantization: `path`)
        "path": str(settings.model),
        "weights_type": weights_type,
        "files": [str(f) for f in files],
        "file_bytes": file_bytes,
        "config": config.to_dict(),
    }
    job = dict(asdict(settings), parts=list(settings.parts), memory_context=memory_context, files=model_facts["files"])
    _read_through(files)  # page cache warm for every run but the cold-load one
    results = _run_parts(settings, job, files, log)
    report = {
        "santacpu_version": santacpu_version(),
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
    report["warnings"] = short_run_warnings(report)  # figures a tiny model's runs cannot back
    return report


def _run_parts(settings: BenchSettings, job: dict, files: list[Path], log: Callable[[str], None]) -> dict:
    """Each chosen part's result (see the module docstring), each part in child processes."""
    results: dict = {}
    if "speed" in settings.parts:
        log("read speed: parallel passes over the model files' mapped pages")
        results["read_speed"] = {"gb_s": measure_read_speed(files, settings.threads), "bytes": sum(f.stat().st_size for f in files)}
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
        log(f"memory: one request filling a {job['memory_context']}-token context")
        results["memory"] = _run_child("memory", job)
    if "load" in settings.parts:
        log("load: page cache dropped for the model's files (best-effort)")
        results["load"] = _run_child("load", job)
    if "compile" in settings.parts:
        cache = owned_temp_folder("santacpu-numba-cache")
        try:
            log("compile: first run with an empty Numba cache")
            first = _run_child("compile", job, {"NUMBA_CACHE_DIR": cache})
            log("compile: second run with the on-disk cache")
            cached = _run_child("compile", job, {"NUMBA_CACHE_DIR": cache})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        results["compile"] = {"first_run": first, "cached_run": cached}
    if settings.batch:
        log(
            f"batch: {BATCH_PROMPT_TOKENS}-token prompts, {BATCH_DECODE_TOKENS} tokens each, "
            f"batch sizes {','.join(map(str, settings.batch))}"
        )
        results["batch"] = _run_child("batch", job)
    return results


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
    from ..errors import OptionValueError  # (values only the model can judge: usage errors, exit 2)

    if parts & {"speed", "lookup"}:
        if min(prompt, decode) < 1:
            raise OptionValueError("--prompt-tokens and --decode-tokens must be at least 1")
        if prompt + decode > n_ctx:
            given = [name for name, value in (("--prompt-tokens", settings.prompt_tokens is not None and prompt),
                                              ("--decode-tokens", settings.decode_tokens is not None and decode)) if value]
            raise OptionValueError(f"a {prompt}-token prompt and {decode} decoded token{'s' * (decode != 1)} "
                                   f"({' and '.join(given) or 'the defaults'}) exceed the model's {n_ctx}-token context")
    if "speed" in parts and not (fim == 0 or MIN_FIM_TOKENS <= fim < n_ctx):
        raise OptionValueError(f"--fim-tokens must be 0 (no FIM request) or between {MIN_FIM_TOKENS} and {n_ctx - 1} "
                               f"(the context holds {n_ctx}; a FIM prompt has 3 marker tokens)")
    memory = settings.memory_context
    if "memory" in parts and (not 0 <= memory <= n_ctx or 0 < memory <= MEMORY_DECODE_TOKENS):
        raise OptionValueError(f"--memory-context must be 0 (the model's whole context) or between "
                               f"{MEMORY_DECODE_TOKENS + 1} and {n_ctx} tokens")
    if shortened and parts & {"speed", "lookup"}:
        log(f"the model's context holds {n_ctx} tokens: measuring {', '.join(shortened)} (shorter than the defaults)")


def describe_model(model: str, revision: str | None = None):
    """(Config, weights type such as "q8_0" or "f32", the weight files) without loading weights."""
    from ..config import Config
    from ..errors import SantacpuError
    from ..formats.quantized_file import names_quantized_file, read_metadata
    from ..loading.source import resolve

    if names_quantized_file(model):
        path = user_path(model)
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
    from ..loading.checkpoint import open_tensors

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


def _dies_with_this_process():
    """A child's preexec_fn on Linux: the child is killed when this process dies, even by SIGKILL
    (which leaves no time to kill it), instead of measuring on for a minute on the cores."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # found here, not in the forked child

    def arm() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; kept across exec
        if os.getppid() != parent:  # this process died before the call
            os._exit(1)

    return arm


_SAID: set[str] = set()  # the children's warnings said in this process (each once)


def _run_child(kind: str, job: dict, env_extra: dict | None = None) -> dict:
    from ..errors import SantacpuError

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
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    child = None
    try:
        with signals_held(children_ignore_sigint=True):
            child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, kind, json.dumps(job)], env=env,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=_dies_with_this_process())
        stdout, _ = child.communicate()
    except BaseException:  # Ctrl-C, SIGTERM: the child goes too
        if child is not None:
            child.kill()
            child.communicate()
        raise
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else -child.returncode
        raise SantacpuError(f"the bench's {kind} run was killed ({name}{': out of memory?' if name == 'SIGKILL' else ''})")
    if child.returncode or not lines:
        raise SantacpuError(f"the bench's {kind} run failed (exit code {child.returncode}; its messages are above)")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    for line in result.pop("warnings_said", []):
        if line not in _SAID:
            _SAID.add(line)
            print(line, file=sys.stderr, flush=True)
    if "error" in result:
        raise SantacpuError(result["error"])
    return result
