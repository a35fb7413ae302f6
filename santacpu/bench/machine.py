"""Memory and machine facts for the bench: peak and current RSS (Linux's /proc where there is
one), resident MB of a file's mappings, dropping a file's cached pages, the CPU, its SIMD flags
and the integer kernels chosen, versions.

May import: the standard library, numpy, numba, `santacpu.backends.cpu.target` and `santacpu.settings` (lazily), the
`santacpu` package's version.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path


def default_threads() -> int:
    """The bench's thread count unless told: every core this process may use."""
    from ..settings import usable_cores

    return usable_cores()


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

    from ..backends.cpu.target import host_target
    from ..settings import Settings

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
        # the CPU backend's target (target.py), None where the float kernels serve
        "integer_kernels": getattr(host_target(), "name", None) if Settings.from_environment().integer_kernels else None,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def santacpu_version() -> str:
    from .. import __version__

    return __version__
