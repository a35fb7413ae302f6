"""NumPy's OpenBLAS thread count, set from Python through ctypes (no extra dependency).

Why: after each call OpenBLAS's worker threads keep spinning for a while, and so do Numba's
OpenMP workers after theirs; with as many threads as cores the two pools then fight over the
cores. Measured on 2 cores: an integer matrix kernel took 46 ms alone and 70-76 ms right after a
tiny BLAS product. A forward whose big products run in Numba (the integer kernels) therefore
keeps BLAS (left with nothing big: the products and attention run in Numba) on the calling
thread for its duration: a 512-token prefill of the full q4_0 model went from 107-112 to 142 tok/s.

Only NumPy's own OpenBLAS is found (by the loaded library's name); with any other BLAS
`single_threaded` does nothing. The setting is process-wide, so other Python threads' NumPy
products run single-threaded for those moments too.

May import: the standard library and numpy only.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os

# (get, set) symbol names by OpenBLAS build: NumPy >= 2 wheels (scipy-openblas, 64-bit ints),
# older wheels, plain builds.
_SYMBOLS = [
    (f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}")
    for prefix in ("scipy_openblas", "openblas")
    for suffix in ("64_", "")
]
_controls: tuple | None | bool = False  # False: not looked up yet


def _candidate_paths() -> list[str]:
    paths = []
    try:
        with open("/proc/self/maps") as maps:  # the libraries this process has loaded (Linux)
            paths += [line.split()[-1] for line in maps if "openblas" in line.lower()]
    except OSError:
        pass
    import numpy

    paths += glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*"))
    return list(dict.fromkeys(paths))


def _find_controls() -> tuple | None:
    for path in _candidate_paths():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, set_ = getattr(library, get_name, None), getattr(library, set_name, None)
            if get is not None and set_ is not None:
                return get, set_
    return None


def controls() -> tuple | None:
    """(get_num_threads, set_num_threads) of NumPy's OpenBLAS, or None."""
    global _controls
    if _controls is False:
        _controls = _find_controls()
    return _controls


@contextlib.contextmanager
def single_threaded():
    """Run BLAS on the calling thread only inside this block (restored after)."""
    found = controls()
    previous = found[0]() if found else 1
    if previous == 1:
        yield
        return
    found[1](1)
    try:
        yield
    finally:
        found[1](previous)
