"""The environment variables santacpu honours, read in this one module and never written.

| variable | meaning | default |
| --- | --- | --- |
| `SANTACPU_MODEL` | the CLI's model when `--model` is not given | `bigcode/santacoder` |
| `SANTACPU_CACHE` | the folder of first-use quantizations | `$XDG_CACHE_HOME/santacpu`, else `~/.cache/santacpu` |
| `SANTACPU_INT_DOT` | `0`: block-quantized products on the float kernels instead of the integer ones | `1` |
| `SANTACPU_Q8_0_X` | `int16`: q8_0's products keep x as int16 on every CPU (the same bits everywhere, its lowest KL divergence); `auto`: as the CPU's target chooses (int8 for the layer matrices on VNNI CPUs, for prompt speed) | `auto` |
| `SANTACPU_API_KEY` | the key `santacpu serve` requires when `--api-key`/`--api-key-file` give none | none |

Each reader asks `Settings.from_environment()` when it needs the values: `load()` for the kernel
choice, the CLI for the model and the server's key, the quantization cache for its folder. Beside
them, `usable_cores()`: the cores this process may run on (its CPU affinity), and
`platform_problem()`: why santacpu cannot run on this operating system, if it cannot.

May import: `santacpu.errors`, `santacpu.paths`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import SantacpuError
from .paths import user_path

MODEL_ENV = "SANTACPU_MODEL"
CACHE_ENV = "SANTACPU_CACHE"
INT_DOT_ENV = "SANTACPU_INT_DOT"
Q8_0_X_ENV = "SANTACPU_Q8_0_X"
API_KEY_ENV = "SANTACPU_API_KEY"


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = environ.get(name) or default
    if value not in choices:
        raise SantacpuError(f"{name}={value!r} is not understood (choose {' or '.join(choices)})")
    return value


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    model: str | None  # None: the CLI's default model
    cache_dir: Path
    integer_kernels: bool
    api_key: str | None = None  # None: the server requires no key
    q8_0_int16: bool = False  # q8_0's x as int16 on every target (SANTACPU_Q8_0_X=int16)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings in `environ` (default: this process's environment); an unknown value of a
        choice is a SantacpuError naming the variable."""
        env = os.environ if environ is None else environ
        if env.get(CACHE_ENV):
            try:
                cache = user_path(env[CACHE_ENV])
            except SantacpuError as problem:
                raise SantacpuError(f"{CACHE_ENV}: {problem}") from None
        else:
            cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "santacpu"
        return cls(
            model=env.get(MODEL_ENV) or None,
            cache_dir=cache,
            integer_kernels=_choice(env, INT_DOT_ENV, ("0", "1"), "1") == "1",
            api_key=env.get(API_KEY_ENV) or None,
            q8_0_int16=_choice(env, Q8_0_X_ENV, ("auto", "int16"), "auto") == "int16",
        )


# Numba reads these when it is imported: NUMBA_NUM_THREADS=0 ended every command, --version
# included, in a traceback from inside Numba, and a misspelt threading layer in one at the first
# parallel kernel.
NUMBA_THREADING_LAYERS = ("default", "safe", "threadsafe", "forksafe", "tbb", "omp", "workqueue")


def platform_problem(platform: str | None = None) -> str | None:
    """Why santacpu cannot run on `platform` (a `sys.platform` value; default this one's), in
    words, or None. Its files are opened, mapped, replaced and locked the POSIX way (Linux and
    macOS); on Windows the first model file read would fail with a traceback."""
    if (sys.platform if platform is None else platform) == "win32":
        return ("santacpu runs on Linux and macOS, not on Windows: run it in WSL (the Windows Subsystem for "
                "Linux: `wsl --install`, then install santacpu inside it)")
    return None


# The most threads santacpu's kernels are run on (`bench --threads`, $NUMBA_NUM_THREADS): far past
# any CPU it serves, and far below where a thread pool fails to start.
MAX_THREADS = 1024


def numba_environment_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """What is wrong with the Numba variables in `environ`, in words, or None."""
    threads = environ.get("NUMBA_NUM_THREADS")
    # (ASCII digits only: str.isdigit takes '²'; and a bound: Numba's pool of 100,000 threads crashed)
    if threads is not None and not (re.fullmatch(r"\s*[0-9]{1,7}\s*", threads) and 0 < int(threads) <= MAX_THREADS):
        return (f"NUMBA_NUM_THREADS={threads!r} is not a whole number from 1 to {MAX_THREADS} (unset, Numba uses "
                "every core)")
    layer = environ.get("NUMBA_THREADING_LAYER")
    if layer is not None and layer not in NUMBA_THREADING_LAYERS:
        return f"NUMBA_THREADING_LAYER={layer!r} is none of {', '.join(NUMBA_THREADING_LAYERS)}"
    return None

