"""How fast this process reads files' pages through memory mappings: the yardstick for decode,
which reads every weight once a token. `santacpu bench` reports decode's bytes/s against the
model file's own read speed, and tools/bench_peers.py measures the peers' files the same way.

Measured per file, never assumed: where a file's pages sit in memory decides much of it. On the
development machine (a virtual machine) two copies of one 709 MB file read at 23 and 38 GB/s, and
decode speeds moved with them. Reading maps the files the way the loader does (huge-page advice)
and sums them as 64-bit integers in parallel chunks, which streams at the memory's speed.

May import: numpy, numba, `santacpu.formats.safetensors_io`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from ...formats.safetensors_io import advise_huge_pages
from ...kernel_cache import track_kernel_sources

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

PASSES = 5  # timed passes; the median is reported (one untimed pass first brings the pages in)
CHUNKS_PER_THREAD = 8  # parallel chunks per Numba thread (evens out the threads' finish times)


@njit(parallel=True, cache=True)
def _sum_words(words, n_chunks):
    """The wrapping sum of `words` (int64: Numba's uint64 sums vectorised worse, 28 against 35
    GB/s), read in n_chunks parallel contiguous chunks."""
    partial = np.zeros(n_chunks, np.int64)
    size = (words.shape[0] + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        chunk = words[c * size : (c + 1) * size]
        total = np.int64(0)
        for i in range(chunk.shape[0]):  # from 0 on: no negative-index check, so LLVM vectorises
            total += chunk[i]
        partial[c] = total
    return partial.sum()


def read_speed_gb_s(paths: list, threads: int | None = None, passes: int = PASSES) -> float | None:
    """Median GB/s (10^9 bytes a second) of `passes` passes over the files' mapped pages with
    `threads` Numba threads (default: as set); None if the files hold less than one word."""
    maps: list[mmap.mmap] = []
    words: list[np.ndarray] = []
    previous = numba.get_num_threads()
    try:
        for path in paths:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    continue
                maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            advise_huge_pages(maps[-1])
            words.append(np.frombuffer(maps[-1], np.int64, count=size // 8))
        if not words:
            return None
        if threads:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return sum(w.nbytes for w in words) / _median_pass_s(words, passes) / 1e9
    finally:
        numba.set_num_threads(previous)
        words.clear()  # the views go before their mappings can close
        for m in maps:
            m.close()


def _median_pass_s(words: list[np.ndarray], passes: int) -> float:
    n_chunks = CHUNKS_PER_THREAD * numba.get_num_threads()
    for array in words:  # bring the pages in (and compile, on a first run)
        _sum_words(array, n_chunks)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for array in words:
            _sum_words(array, n_chunks)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
