"""The one-time transpose of GPT-2 Conv1D weights ([in, out] -> [out, in]) while loading the
legacy checkpoint layout: a loading step, not a backend kernel (it runs once, whatever backend
then runs the model).

May import: numba, numpy, `santacpu.kernel_cache`.
"""

from __future__ import annotations

from numba import njit, prange

from ..kernel_cache import track_kernel_sources

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)


@njit(parallel=True, cache=True)
def transpose_into(src, dst):
    """dst [C, R] = src [R, C].T, in square tiles so both sides stay in cache (2.4x NumPy's
    strided copy on a 2048 x 8192 fp32 matrix, measured). For fp16 pass uint16 views."""
    R, C = src.shape
    tile = 32
    for col_tile in prange((C + tile - 1) // tile):
        c0 = col_tile * tile
        c1 = min(C, c0 + tile)
        for r0 in range(0, R, tile):
            r1 = min(R, r0 + tile)
            for c in range(c0, c1):
                for r in range(r0, r1):
                    dst[c, r] = src[r, c]
