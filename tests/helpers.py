"""Shared test helpers: tiny random checkpoints built once per test process (NumPy only), files
rewritten with a change, and the `santacpu` command line run as a subprocess, also where file
permissions apply (root without its bypassing capabilities) or on a small or read-only file system."""

from __future__ import annotations

import atexit
import functools
import json
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.random_checkpoint import write_checkpoint  # noqa: E402

import numpy as np  # noqa: E402

from santacpu.formats.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402

_root: Path | None = None
_built: dict[tuple, Path] = {}


def tiny_checkpoint(layout: str = "gpt_bigcode", dtype: str = "float32", multi_query: bool = True, seed: int = 0) -> Path:
    """A tiny checkpoint folder (config.json, model.safetensors, tokenizer.json); do not modify it:
    copy it first (`copy_checkpoint`) to make a broken variant."""
    global _root
    key = (layout, dtype, multi_query, seed)
    if key not in _built:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="santacpu-tests-"))
            atexit.register(shutil.rmtree, _root, True)
        name = f"{layout}-{dtype}-{'mq' if multi_query else 'mh'}-{seed}"
        _built[key] = write_checkpoint(_root / name, layout=layout, dtype=dtype, multi_query=multi_query, seed=seed)
    return _built[key]


def copy_checkpoint(dest: Path, **kind) -> Path:
    shutil.copytree(tiny_checkpoint(**kind), dest)
    return dest


def mmap_owner(array: np.ndarray) -> mmap.mmap | None:
    """The mmap at the root of `array`'s chain of buffer owners (views, as_strided's helper,
    memoryview), or None when the data is not memory-mapped."""
    owner = array
    while not isinstance(owner, mmap.mmap):
        if isinstance(owner, memoryview):
            owner = owner.obj
        elif getattr(owner, "base", None) is not None:
            owner = owner.base
        else:
            return None
    return owner


def rewrite_safetensors(src: Path, dest: Path, metadata: Callable[[dict], None] | None = None,
                        tensors: Callable[[dict], None] | None = None) -> Path:
    """A copy of the safetensors file `src` at `dest`, its metadata and/or its tensors (writable
    copies, by name) first changed in place by the given functions."""
    file = SafetensorsFile(src)
    new_metadata, arrays = dict(file.metadata), {n: np.array(file.array(n)) for n in file.names()}
    (metadata or (lambda m: None))(new_metadata)
    (tensors or (lambda t: None))(arrays)
    write_safetensors(dest, arrays, new_metadata)
    return dest


def edit_json(metadata: dict, key: str, change) -> None:
    """Replace the JSON text `metadata[key]` by `change(its value)`, as a hand edit would."""
    metadata[key] = json.dumps(change(json.loads(metadata[key])))



# Hand edits of a quantized file's metadata, each with what its error must say (parameters of the
# API's and the command line's tests).
HAND_EDITS = [
    pytest.param(lambda m: edit_json(m, "tensors", lambda t: list(t.values())), "'tensors' is an array, not an object",
                 id="tensors-list"),
    pytest.param(lambda m: edit_json(m, "tensors", lambda t: {**t, "wpe": {"shape": t["wpe"]["shape"]}}),
                 "tensor 'wpe' has no 'type'", id="no-type"),
    pytest.param(lambda m: edit_json(m, "config", lambda c: list(c.values())), "'config' is an array, not an object",
                 id="config-list"),
    pytest.param(lambda m: edit_json(m, "config", lambda c: {**c, "n_embd": "64"}),
                 "field 'n_embd' is \"64\", not an integer", id="n_embd-text"),
    pytest.param(lambda m: edit_json(m, "config", lambda c: {**c, "n_layer": 0}), "non-positive size: n_layer 0",
                 id="no-layers"),
    # `info` passed these, and `complete` then blamed NaN weights or an unnamed JSON text.
    pytest.param(lambda m: edit_json(m, "config", lambda c: {**c, "layer_norm_epsilon": float("nan")}),
                 "field 'layer_norm_epsilon' is NaN, not a number in (0, 1)", id="epsilon-nan"),
    pytest.param(lambda m: m.update(tokenizer="{not json"), "the tokenizer in", id="tokenizer-corrupt"),
    # Found by mutating files: generation never stopped, and perplexity blamed a token id.
    pytest.param(lambda m: edit_json(m, "config", lambda c: {**c, "eos_token_id": 98304}),
                 "field 'eos_token_id' is 98304, not a token id below vocab_size", id="eos-outside"),
    # Found by a red team: a TypeError traceback; and a message split over two lines (the CLI's
    # test checks it is one).
    pytest.param(lambda m: edit_json(m, "tensors", lambda t: {**t, "h.0.ln_1_weight": {**t["h.0.ln_1_weight"],
                                                                                     "type": "q8_0"}}),
                 "tensor 'h.0.ln_1_weight' of type q8_0 is not a matrix", id="vector-as-blocks"),
    pytest.param(lambda m: edit_json(m, "tensors", lambda t: {**t, "wte": {**t["wte"], "type": "q9_9\nforged"}}),
                 "has unknown quantization type 'q9_9", id="newline-in-type"),
]

def overlapping_copy(src: Path, dest: Path) -> Path:
    """A copy of the safetensors file `src` whose second tensor's offsets point into the first's
    bytes (its size unchanged, so only the overlap is wrong)."""
    raw = src.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    spans = sorted((e["data_offsets"], n) for n, e in header.items() if n != "__metadata__" and e["data_offsets"][1])
    (first_begin, _), _ = spans[0]
    (begin, end), second = spans[1]
    header[second]["data_offsets"] = [first_begin, first_begin + end - begin]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    dest.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    return dest


def santacpu_env(extra: dict | None = None) -> dict:
    """The environment the CLI tests run santacpu in: offline, UTF-8, no SANTACPU_MODEL, `extra` added."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", COLUMNS="120")
    environment.pop("SANTACPU_MODEL", None)
    return {**environment, **(extra or {})}


def default_sigint() -> None:
    """A child's preexec_fn: SIGINT back to its default. A test run started in the background
    (`cmd &` in a script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_santacpu(*args: str, env: dict | None = None, prefix: list[str] | tuple = (), stdin: bytes = b"",
                 umask: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m santacpu ARGS` (the entry point `santacpu` runs) in `santacpu_env(env)`, after a
    command `prefix` (see `unprivileged`, `on_tmpfs`), with `umask` applied to the child."""
    return settled(subprocess.run([*prefix, sys.executable, "-m", "santacpu", *map(str, args)], input=stdin,
                                  capture_output=True, env=santacpu_env(env), timeout=timeout,
                                  preexec_fn=None if umask is None else lambda: os.umask(umask)))


def settled(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`done` with its captured stderr less the first-compile notice (see without_compile_notice):
    what a run prints once its kernels are in Numba's cache."""
    if done.stderr is not None:
        done.stderr = without_compile_notice(done.stderr)
    return done


def line(text: str) -> str:
    """What `santacpu complete` prints for a completion `text`: it ends with a newline."""
    return text if text.endswith("\n") else text + "\n"


def one_error_line(done: subprocess.CompletedProcess, fragment: str, code: int = 1) -> str:
    """The run failed with `code` and said why in one `santacpu: error:` line holding `fragment`,
    with nothing on stdout and no traceback."""
    err = done.stderr.decode(errors="replace")
    assert done.returncode == code and "Traceback" not in err, (done.returncode, err)
    assert done.stdout == b"", done.stdout
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("santacpu: error: ") and fragment in lines[0], err
    return lines[0]


_DROP_DAC = "-dac_override,-dac_read_search"


@functools.cache
def _works(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: none for an ordinary user; for root,
    setpriv without the capabilities that bypass permissions (the test is skipped without it)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", _DROP_DAC, "--inh-caps", _DROP_DAC, "--"]
    if not _works(*prefix, "true"):
        pytest.skip("running as root, and setpriv cannot drop the capabilities that bypass file permissions")
    return prefix


def on_tmpfs(folder: Path, kilobytes: int, listing: Path, read_only: bool = False) -> list[str]:
    """A command prefix that runs the command with a fresh tmpfs of `kilobytes` (read-only if asked)
    mounted on the existing `folder`, in private user and mount namespaces (the test is skipped
    where those are not allowed). What the folder holds afterwards is written to `listing`, one
    name a line, since the mount is gone with the namespace."""
    if not _works("unshare", "--user", "--map-root-user", "--mount", "true"):
        pytest.skip("unshare cannot make a private mount namespace here")
    mount = f"mount -t tmpfs -o size={kilobytes}k tmpfs '{folder}'"
    if read_only:
        mount += f" && mount -o remount,ro '{folder}'"
    script = f"{mount} || exit 99; \"$@\"; code=$?; ls -A '{folder}' > '{listing}'; exit $code"
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]


_MEMORY_CAPPED = """
import resource, sys
{setup}
with open("/proc/self/status") as status:
    vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
limit = (vm_kib << 10) + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
{body}
"""


def without_compile_notice(stderr: str | bytes) -> str | bytes:
    """stderr less the line a first compile prints (santacpu.kernel_cache.COMPILE_NOTICE): a
    child that happens to compile a kernel no earlier test had compiled says so."""
    from santacpu.kernel_cache import COMPILE_NOTICE

    line = COMPILE_NOTICE + "\n"
    return stderr.replace(line.encode(), b"") if isinstance(stderr, bytes) else stderr.replace(line, "")


def run_memory_capped(setup: str, body: str, *args: str, headroom: int = 256 << 20, timeout: float = 120) -> str:
    """The stdout of a child Python that runs `setup` (imports), then `body` with at most `headroom`
    more bytes of address space than the setup left it (sys.argv[1:] = `args`): a reader that would
    take gigabytes fails there, with a MemoryError, instead of taking them from the test machine.
    The child must exit 0 within `timeout` seconds, quietly on stderr."""
    script = _MEMORY_CAPPED.format(setup=setup, body=body, headroom=headroom)
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and without_compile_notice(done.stderr) == "", done.stderr
    return done.stdout.strip()


class SlowSteps:
    """A model's engine with every batched step slowed by 50 ms, so that a generation outlives a
    hang-up or a signal (the server's tests)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward_batch(self, *args):
        time.sleep(0.05)
        return self.engine.forward_batch(*args)
