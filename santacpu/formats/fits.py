"""The block formats' scale searches, compiled: bit-identical twins of `blocks._symmetric_scale`'s
weighted search and of `blocks._q4m_fit`, which stay the NumPy reference (tests/test_quant_formats.py
compares every output bit). `BlockFormat.quantize` runs these; their NumPy forms spent most of a
conversion's time in array temporaries (21 candidate scales a block, each a handful of passes).
They release the GIL, so a conversion quantizes QUANTIZING_THREADS matrices at once on threads.

Why the bits agree: the same float32 products, rounded and clipped codes, float32 sums over a
block's 32 values in the same order (k = 0..31, one accumulator from +0, no fused multiply-add
without fast-math: blocks._block_dots), the same max and min of a block down to the sign of a zero
(blocks._block_max_min), and the same float64 arithmetic after, expression by expression. Both
spell these out rather than leave them to NumPy's per-CPU kernels, so the bits are the same on
every CPU.

Shapes: blocks are the columns of xt [32, N] (blocks._blocks_t), importance wt the same; an empty
[0, 0] wt means no weighting. Loops run over a tile of TILE blocks innermost (contiguous in xt):
the per-block arithmetic vectorises across blocks, as NumPy's did, and a tile's values stay in cache
through all the candidate scales.

May import: numpy, numba, `santacpu.kernel_cache`, `santacpu.settings` (the usable cores).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..kernel_cache import track_kernel_sources
from ..settings import usable_cores

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

NO_WEIGHTS = np.empty((0, 0), np.float32)
# Matrices a conversion quantizes at once, on threads (these kernels release the GIL): this
# process's cores, at most 4 (each in flight holds its float32 copy, codes and dequantized values:
# ~200 MB for SantaCoder's largest matrices). The results do not depend on it.
QUANTIZING_THREADS = min(4, usable_cores())
TILE = 256  # blocks searched together: xt and wt of a tile are 64 KB
# The q4_m search's stretches and refits (blocks.py reads them from here).
Q4M_STRETCH = np.array([-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0])
Q4M_REFITS = 3


@njit(cache=True, nogil=True)
def _round_clip(v, lo, hi):
    r = np.rint(v)
    return min(max(r, lo), hi)


@njit(cache=True, nogil=True)
def block_max_min(xt, hi, lo):
    """hi, lo [N] = blocks._block_max_min(xt): each block's max and min, of equal values the later."""
    _tile_max_min(xt, 0, xt.shape[1], hi, lo)


@njit(cache=True, nogil=True)
def _tile_max_min(xt, j0, j1, hi, lo):
    """hi, lo [j1 - j0] = the max and min of blocks j0..j1-1, of equal values (+0 and -0) the later
    one (blocks._block_max_min)."""
    for jj in range(j1 - j0):
        hi[jj] = xt[0, j0 + jj]
        lo[jj] = xt[0, j0 + jj]
    for k in range(1, xt.shape[0]):
        for jj in range(j1 - j0):
            v = xt[k, j0 + jj]
            hi[jj] = v if v >= hi[jj] else hi[jj]
            lo[jj] = v if v <= lo[jj] else lo[jj]


@njit(cache=True, nogil=True)
def symmetric_scale_weighted(xt, wt, qmin, qmax, signed_max, out):
    """out [N] float32 = blocks._symmetric_scale(xt, wt, qmin, qmax, signed_max) for weights wt
    (the make_qx_quants search described there)."""
    K, N = xt.shape
    lo_code = np.float32(qmin)
    hi_code = np.float32(qmax)
    n = -qmin if signed_max else qmax
    stretch = np.empty(19, np.float32)
    for i in range(19):
        stretch[i] = np.float32((n + 0.1 * (i - 9)) / n)
    hi = np.empty(TILE, np.float32)
    lo = np.empty(TILE, np.float32)
    inv = np.empty(TILE, np.float32)
    iscale = np.empty(TILE, np.float32)
    sxq = np.empty(TILE, np.float32)
    sqq = np.empty(TILE, np.float32)
    best_score = np.empty(TILE)
    best_d = np.empty(TILE)
    for j0 in range(0, N, TILE):
        j1 = min(N, j0 + TILE)
        width = j1 - j0
        _tile_max_min(xt, j0, j1, hi, lo)
        for jj in range(width):
            if signed_max:
                base = (hi[jj] if hi[jj] >= -lo[jj] else lo[jj]) / np.float32(qmin)
            else:
                base = (hi[jj] if hi[jj] > -lo[jj] else -lo[jj]) / np.float32(qmax)  # of equals, -lo
            inv[jj] = np.float32(1.0) / base if base != 0 else np.float32(0.0)
            best_score[jj] = -np.inf
            best_d[jj] = np.float64(base)
        for step in range(21):
            for jj in range(width):
                if step < 19:
                    iscale[jj] = inv[jj] * stretch[step]
                else:  # two round-and-refit passes from the winner
                    iscale[jj] = np.float32(1.0 / best_d[jj]) if best_d[jj] != 0 else np.float32(0.0)
                sxq[jj] = 0.0
                sqq[jj] = 0.0
            for k in range(K):
                for jj in range(width):
                    x = xt[k, j0 + jj]
                    q = _round_clip(x * iscale[jj], lo_code, hi_code)
                    wq = wt[k, j0 + jj] * q
                    sxq[jj] += wq * x
                    sqq[jj] += wq * q
            for jj in range(width):
                xq = np.float64(sxq[jj])
                qq = np.float64(sqq[jj])
                if qq > 0 and xq * xq / qq > best_score[jj]:
                    best_score[jj] = xq * xq / qq
                    best_d[jj] = xq / qq
        for jj in range(width):
            out[j0 + jj] = np.float32(best_d[jj])


@njit(cache=True, nogil=True)
def q4m_fit(xt, wt, scale, offset):
    """scale, offset [N] float64 = blocks._q4m_fit(xt, wt) (wt [0, 0]: unweighted)."""
    weighted = wt.shape[0] != 0
    K, N = xt.shape
    hi = np.empty(TILE, np.float32)
    lo = np.empty(TILE, np.float32)
    sw = np.empty(TILE)
    sx = np.empty(TILE)
    sxx = np.empty(TILE, np.float32)
    shift = np.empty(TILE, np.float32)
    iscale = np.empty(TILE, np.float32)
    sq = np.empty(TILE)
    sqq = np.empty(TILE, np.float32)
    sxq = np.empty(TILE, np.float32)
    inv_span = np.empty(TILE)
    best_err = np.empty(TILE)
    best_s = np.empty(TILE)
    best_m = np.empty(TILE)
    n_stretch = Q4M_STRETCH.shape[0]
    for j0 in range(0, N, TILE):
        j1 = min(N, j0 + TILE)
        width = j1 - j0
        _tile_max_min(xt, j0, j1, hi, lo)
        for jj in range(width):
            lo[jj] = lo[jj] if lo[jj] < 0 else np.float32(0.0)
            span = np.float64(hi[jj] - lo[jj])
            inv_span[jj] = 1.0 / span if span > 0 else 0.0
            best_err[jj] = np.inf
            best_s[jj] = span / 15
            best_m[jj] = np.float64(lo[jj])
            sw[jj] = 0.0
            sx[jj] = 0.0
            sxx[jj] = 0.0
        for k in range(K):
            for jj in range(width):
                x = xt[k, j0 + jj]
                if weighted:
                    w = wt[k, j0 + jj]
                    wx = w * x
                    sw[jj] += np.float64(w)
                else:
                    wx = x
                    sw[jj] += 1.0
                sx[jj] += np.float64(wx)
                sxx[jj] += wx * x
        for step in range(n_stretch + Q4M_REFITS):
            for jj in range(width):
                if step < n_stretch:
                    shift[jj] = lo[jj]
                    iscale[jj] = np.float32(inv_span[jj] * (15 + Q4M_STRETCH[step]))
                else:
                    shift[jj] = np.float32(best_m[jj])
                    iscale[jj] = np.float32(1.0 / best_s[jj] if best_s[jj] > 0 else 0.0)
                sq[jj] = 0.0
                sqq[jj] = 0.0
                sxq[jj] = 0.0
            for k in range(K):
                for jj in range(width):
                    x = xt[k, j0 + jj]
                    q = _round_clip((x - shift[jj]) * iscale[jj], np.float32(0.0), np.float32(15.0))
                    wq = wt[k, j0 + jj] * q if weighted else q
                    sq[jj] += np.float64(wq)
                    sqq[jj] += wq * q
                    sxq[jj] += wq * x
            for jj in range(width):
                qq = np.float64(sqq[jj])
                xq = np.float64(sxq[jj])
                det = sw[jj] * qq - sq[jj] * sq[jj]
                ok = det > 0
                if not ok:
                    det = 1.0
                s = (sw[jj] * xq - sx[jj] * sq[jj]) / det
                m = (qq * sx[jj] - sq[jj] * xq) / det
                if m > 0:  # keep min <= 0: refit the scale alone with min = 0
                    m = 0.0
                    s = xq / (qq if qq > 0 else 1.0)
                err = s * s * qq + 2 * s * m * sq[jj] - 2 * s * xq + m * m * sw[jj] - 2 * m * sx[jj] + np.float64(sxx[jj])
                if ok and s > 0 and err < best_err[jj]:
                    best_err[jj] = err
                    best_s[jj] = s
                    best_m[jj] = m
        for jj in range(width):
            scale[j0 + jj] = best_s[jj] + 0.0  # + 0.0: a zero is +0 (as blocks._q4m_fit)
            offset[j0 + jj] = -best_m[jj] + 0.0
