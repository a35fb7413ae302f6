"""Numba kernels on block-quantized weights: matrix-vector products straight from the packed
parts (decode), and row ranges dequantized into float32 tiles (prefill through BLAS).

The block formats (q8_0, q4_0, q4_m, q6_0) are defined, documented as layout tables, and
quantized in `santacpu/formats/blocks.py`; its `dequantize` is the plain-NumPy twin every kernel here is
tested against. A weight is [R, C] in blocks of QK = 32 along C, stored as parts that each have R
as their first dimension. Kernels take the parts as positional arrays in PART_ORDER, fp16 parts
as their uint16 bits (Numba has no CPU float16 type), and never allocate per row.

How the kernels stay in SIMD (each choice measured, one thread, 8192 x 2048; docs/kernels.md):
- Numba runs LLVM's loop vectoriser but not its SLP vectoriser, so a short loop that LLVM fully
  unrolls (the 16 lanes of one row) stays scalar. The lane loop therefore carries ROWS rows in
  its body: too big to unroll, it is vectorised, and each loaded slice of x serves ROWS rows.
- The lane accumulators live in `_stack_zeros` arrays (the function's stack frame), not
  np.zeros: LLVM keeps them in vector registers and needs no runtime alias checks against the
  weights. Per-block scales are register tuples (`_f16_scales`), since a scale array would be
  re-read after every store to `out`.
- Codes are widened to float32 first and split there with exact power-of-two floors
  (hi = floor(v / 16) of a byte v), so no int64 arithmetic (Numba's integer promotion) enters
  the loop.
- Constant offsets (q - 8, q - 32, q4_m's minimum) are not subtracted per value: x's per-block
  sums are computed once per call and each offset enters once per block and row.
- The accumulators are reduced once per row, not per block.
- Kernels here inline helpers from cpu_kernels.py; the cache key of `santacpu.kernel_cache`
  covers every file of this folder, so a change to cpu_kernels.py alone compiles them again.
- While a step works on its ROWS rows, it prefetches the codes of the rows PREFETCH_STEPS steps
  ahead, one block's worth per block: the hardware prefetcher alone falls far short of the
  memory's read speed.

QK and each format's part order come from `santacpu.formats.blocks`.
Which kernel serves which format: `kernels.py` (FORMAT_KERNELS).
May import: numba, numpy, `santacpu.formats`, `santacpu.backends.cpu.cpu_kernels`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...formats.blocks import QK
from ...kernel_cache import track_kernel_sources
from .cpu_kernels import (
    FASTMATH,
    ROWS,
    f16_to_f32,
    _prefetch,
    _stack_zeros,
    rows_times_tokens,
    thread_chunk,
)

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

HALF = 16  # lanes per row in the 4-bit and 8-bit loops: a block's values j and j+16 share a lane
# ROWS (from cpu_kernels, shared with the few-token kernels) = 4 rows per matvec / dequantize step
# (8 float accumulator vectors on AVX2); the scale helpers below return ROWS-tuples written out for 4

PREFETCH_STEPS = 2  # how far ahead the matvec kernels prefetch, in ROWS-row steps (1..8 measured
# within 3% of each other)
CACHE_LINE = 64


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _prefetch_ahead(codes, first, b, block_bytes):
    """Prefetch block b's share of the rows PREFETCH_STEPS steps after rows first..first+ROWS-1
    of a C-contiguous byte array codes [R, n]: ROWS * block_bytes bytes, so that the blocks of
    one step together fetch the whole next region once."""
    start = (first + PREFETCH_STEPS * ROWS) * codes.shape[1] + b * ROWS * block_bytes
    end = min(start + ROWS * block_bytes, codes.size)
    for flat in range(start, end, CACHE_LINE):
        _prefetch(codes, flat)


@njit(fastmath=FASTMATH, cache=True)
def _block_sums(x):
    """sum of x over each block -> float32 [C / QK] (the offsets' per-block factor)."""
    n_blocks = x.shape[0] // QK
    sums = np.empty(n_blocks, np.float32)
    for b in range(n_blocks):
        s = np.float32(0.0)
        for j in range(QK):
            s += x[b * QK + j]
        sums[b] = s
    return sums


@njit(fastmath=FASTMATH, cache=True)
def _nibble_partners(x):
    """y [C/2]: y[16b + j] = x[32b + 16 + j] - 16 x[32b + j], so that for a byte v = lo + 16 hi
    holding values j (lo) and j+16 (hi) of block b: lo*x[j] + hi*x[j+16] = v*x[j] + hi*y[j],
    which needs only hi = floor(v/16) (the y-trick; amplifies float32 rounding ~17x, measured
    relative error < 1e-6)."""
    n_blocks = x.shape[0] // QK
    y = np.empty(n_blocks * HALF, np.float32)
    for b in range(n_blocks):
        for j in range(HALF):
            y[b * HALF + j] = x[b * QK + HALF + j] - np.float32(16.0) * x[b * QK + j]
    return y


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _f16_scales(d, row, b, rows):
    """fp16 scales d[row .. row+rows-1, b] as a ROWS-tuple of float32 (zeros past `rows`). A tuple
    lives in registers; a small array of scales was re-read after every store to `out` (2.5x
    slower dequantization, measured)."""
    zero = np.float32(0.0)
    return (
        f16_to_f32(d[row, b]),
        f16_to_f32(d[row + 1, b]) if rows > 1 else zero,
        f16_to_f32(d[row + 2, b]) if rows > 2 else zero,
        f16_to_f32(d[row + 3, b]) if rows > 3 else zero,
    )


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _coded_scales(d, codes, row, b, rows):
    """q4_m's block scales d[r, 0] * codes[r, b] (or offsets dmin * mn) for rows row..row+rows-1,
    as a ROWS-tuple of float32 like _f16_scales."""
    zero = np.float32(0.0)
    return (
        d[row, 0] * np.float32(codes[row, b]),
        d[row + 1, 0] * np.float32(codes[row + 1, b]) if rows > 1 else zero,
        d[row + 2, 0] * np.float32(codes[row + 2, b]) if rows > 2 else zero,
        d[row + 3, 0] * np.float32(codes[row + 3, b]) if rows > 3 else zero,
    )


# --- q8_0: qs int8 [R, C], d f16 [R, C/32]; W = d * q ----------------------------------------------


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _matvec_rows_q8_0(qs, d, x, first, rows, bias, out):
    """out[first:first+rows] for rows = ROWS (vectorised) or 1 (the tail)."""
    acc = _stack_zeros(ROWS, HALF)
    for b in range(qs.shape[1] // QK):
        c0 = b * QK
        _prefetch_ahead(qs, first, b, QK)
        scale = _f16_scales(d, first, b, rows)
        for lane in range(HALF):
            x0 = x[c0 + lane]
            x1 = x[c0 + HALF + lane]
            for i in range(rows):
                q0 = np.float32(qs[first + i, c0 + lane])
                q1 = np.float32(qs[first + i, c0 + HALF + lane])
                acc[i, lane] += scale[i] * (q0 * x0 + q1 * x1)
    for i in range(rows):
        out[first + i] = acc[i].sum() + bias[first + i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_q8_0(qs, d, x, bias, out):
    """out[r] = W[r] @ x + bias[r] for a q8_0 weight: qs int8 [R, C], d uint16 (fp16 bits)
    [R, C/32]; x [C], bias [R], out [R] float32."""
    n_out = qs.shape[0]
    for step in prange((n_out + ROWS - 1) // ROWS):
        first = step * ROWS
        if first + ROWS <= n_out:
            _matvec_rows_q8_0(qs, d, x, first, ROWS, bias, out)
        else:
            for r in range(first, n_out):
                _matvec_rows_q8_0(qs, d, x, r, 1, bias, out)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dequantize_rows_q8_0(qs, d, first, r0, rows, out):
    for b in range(qs.shape[1] // QK):
        c0 = b * QK
        scale = _f16_scales(d, first + r0, b, rows)
        for j in range(QK):
            for i in range(rows):
                out[r0 + i, c0 + j] = scale[i] * np.float32(qs[first + r0 + i, c0 + j])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dequantize_rows_q8_0(qs, d, first, last, out):
    """out[:last-first] = float32 rows first..last-1 of a q8_0 weight (parts as matvec_q8_0)."""
    n = last - first
    for step in prange((n + ROWS - 1) // ROWS):
        r0 = step * ROWS
        if r0 + ROWS <= n:
            _dequantize_rows_q8_0(qs, d, first, r0, ROWS, out)
        else:
            for r in range(r0, n):
                _dequantize_rows_q8_0(qs, d, first, r, 1, out)


# --- q4_0: qs u8 [R, C/2] (byte j of a block = q[j] | q[j+16] << 4), d f16 [R, C/32];
# W = d * (q - 8) ----------------------------------------------------------------------------------


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _matvec_rows_q4_0(qs, d, x, y, xsum, first, rows, bias, out):
    acc = _stack_zeros(ROWS, HALF)
    offset = _stack_zeros(1, ROWS)[0]  # sum over blocks of d * xsum: times 8 at the end
    for b in range(qs.shape[1] // HALF):
        c0 = b * QK
        _prefetch_ahead(qs, first, b, HALF)
        scale = _f16_scales(d, first, b, rows)
        for i in range(rows):
            offset[i] += scale[i] * xsum[b]
        for lane in range(HALF):
            x0 = x[c0 + lane]
            y0 = y[b * HALF + lane]
            for i in range(rows):
                v = np.float32(qs[first + i, b * HALF + lane])
                hi = np.floor(v * np.float32(1.0 / 16.0))
                acc[i, lane] += scale[i] * (v * x0 + hi * y0)
    for i in range(rows):
        out[first + i] = acc[i].sum() - np.float32(8.0) * offset[i] + bias[first + i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_q4_0(qs, d, x, bias, out):
    """out[r] = W[r] @ x + bias[r] for a q4_0 weight: qs uint8 [R, C/2], d uint16 (fp16 bits)
    [R, C/32]; x [C], bias [R], out [R] float32."""
    n_out = qs.shape[0]
    y = _nibble_partners(x)
    xsum = _block_sums(x)
    for step in prange((n_out + ROWS - 1) // ROWS):
        first = step * ROWS
        if first + ROWS <= n_out:
            _matvec_rows_q4_0(qs, d, x, y, xsum, first, ROWS, bias, out)
        else:
            for r in range(first, n_out):
                _matvec_rows_q4_0(qs, d, x, y, xsum, r, 1, bias, out)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dequantize_rows_q4_0(qs, d, first, r0, rows, out):
    for b in range(qs.shape[1] // HALF):
        c0 = b * QK
        scale = _f16_scales(d, first + r0, b, rows)
        for j in range(HALF):
            for i in range(rows):
                v = np.float32(qs[first + r0 + i, b * HALF + j])
                hi = np.floor(v * np.float32(1.0 / 16.0))
                out[r0 + i, c0 + j] = scale[i] * (v - np.float32(16.0) * hi - np.float32(8.0))
                out[r0 + i, c0 + HALF + j] = scale[i] * (hi - np.float32(8.0))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dequantize_rows_q4_0(qs, d, first, last, out):
    """out[:last-first] = float32 rows first..last-1 of a q4_0 weight (parts as matvec_q4_0)."""
    n = last - first
    for step in prange((n + ROWS - 1) // ROWS):
        r0 = step * ROWS
        if r0 + ROWS <= n:
            _dequantize_rows_q4_0(qs, d, first, r0, ROWS, out)
        else:
            for r in range(r0, n):
                _dequantize_rows_q4_0(qs, d, first, r, 1, out)


# --- q4_m: qs as q4_0, sc/mn u8 [R, C/32], d/dmin f32 [R, 1]; W = (d*sc) * q - (dmin*mn) --------


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _matvec_rows_q4_m(qs, sc, mn, d, dmin, x, y, xsum, first, rows, bias, out):
    acc = _stack_zeros(ROWS, HALF)
    offset = _stack_zeros(1, ROWS)[0]  # sum over blocks of (dmin*mn) * xsum
    for b in range(qs.shape[1] // HALF):
        c0 = b * QK
        _prefetch_ahead(qs, first, b, HALF)
        scale = _coded_scales(d, sc, first, b, rows)
        minimum = _coded_scales(dmin, mn, first, b, rows)
        for i in range(rows):
            offset[i] += minimum[i] * xsum[b]
        for lane in range(HALF):
            x0 = x[c0 + lane]
            y0 = y[b * HALF + lane]
            for i in range(rows):
                v = np.float32(qs[first + i, b * HALF + lane])
                hi = np.floor(v * np.float32(1.0 / 16.0))
                acc[i, lane] += scale[i] * (v * x0 + hi * y0)
    for i in range(rows):
        out[first + i] = acc[i].sum() - offset[i] + bias[first + i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_q4_m(qs, sc, mn, d, dmin, x, bias, out):
    """out[r] = W[r] @ x + bias[r] for a q4_m weight: qs uint8 [R, C/2], sc, mn uint8 [R, C/32],
    d, dmin float32 [R, 1]; x [C], bias [R], out [R] float32."""
    n_out = qs.shape[0]
    y = _nibble_partners(x)
    xsum = _block_sums(x)
    for step in prange((n_out + ROWS - 1) // ROWS):
        first = step * ROWS
        if first + ROWS <= n_out:
            _matvec_rows_q4_m(qs, sc, mn, d, dmin, x, y, xsum, first, ROWS, bias, out)
        else:
            for r in range(first, n_out):
                _matvec_rows_q4_m(qs, sc, mn, d, dmin, x, y, xsum, r, 1, bias, out)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dequantize_rows_q4_m(qs, sc, mn, d, dmin, first, r0, rows, out):
    for b in range(qs.shape[1] // HALF):
        c0 = b * QK
        scale = _coded_scales(d, sc, first + r0, b, rows)
        minimum = _coded_scales(dmin, mn, first + r0, b, rows)
        for j in range(HALF):
            for i in range(rows):
                v = np.float32(qs[first + r0 + i, b * HALF + j])
                hi = np.floor(v * np.float32(1.0 / 16.0))
                out[r0 + i, c0 + j] = scale[i] * (v - np.float32(16.0) * hi) - minimum[i]
                out[r0 + i, c0 + HALF + j] = scale[i] * hi - minimum[i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dequantize_rows_q4_m(qs, sc, mn, d, dmin, first, last, out):
    """out[:last-first] = float32 rows first..last-1 of a q4_m weight (parts as matvec_q4_m)."""
    n = last - first
    for step in prange((n + ROWS - 1) // ROWS):
        r0 = step * ROWS
        if r0 + ROWS <= n:
            _dequantize_rows_q4_m(qs, sc, mn, d, dmin, first, r0, ROWS, out)
        else:
            for r in range(r0, n):
                _dequantize_rows_q4_m(qs, sc, mn, d, dmin, first, r, 1, out)


# --- q6_0: ql u8 [R, C/2] (low 4 bits, q4_0 nibble order), qh u8 [R, C/4] (high 2 bits: byte j
# of a block, j = 0..7, holds values j, j+8, j+16, j+24 at bits 0-1, 2-3, 4-5, 6-7), d f16
# [R, C/32]; W = d * (q - 32). The lane loop runs over the 8 qh bytes of a block: lane j reads
# ql bytes j and j+8 and qh byte j, and so rebuilds all four values j, j+8, j+16, j+24. ------------


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _q6_codes(a, c, u):
    """ql bytes a (values j, j+16), c (values j+8, j+24) and qh byte u, as float32 -> the four
    6-bit codes of values j, j+8, j+16, j+24, exact (floors of power-of-two fractions)."""
    a_hi = np.floor(a * np.float32(1.0 / 16.0))
    c_hi = np.floor(c * np.float32(1.0 / 16.0))
    u1 = np.floor(u * np.float32(1.0 / 4.0))  # u >> 2
    u2 = np.floor(u * np.float32(1.0 / 16.0))  # u >> 4
    u3 = np.floor(u * np.float32(1.0 / 64.0))  # u >> 6
    sixteen = np.float32(16.0)
    four = np.float32(4.0)
    q_j = (a - sixteen * a_hi) + sixteen * (u - four * u1)
    q_j8 = (c - sixteen * c_hi) + sixteen * (u1 - four * u2)
    q_j16 = a_hi + sixteen * (u2 - four * u3)
    q_j24 = c_hi + sixteen * u3
    return q_j, q_j8, q_j16, q_j24


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _matvec_rows_q6_0(ql, qh, d, x, xsum, first, rows, bias, out):
    acc = _stack_zeros(ROWS, 8)
    offset = _stack_zeros(1, ROWS)[0]  # sum over blocks of d * xsum: times 32 at the end
    for b in range(ql.shape[1] // HALF):
        c0 = b * QK
        _prefetch_ahead(ql, first, b, HALF)
        _prefetch_ahead(qh, first, b, 8)
        scale = _f16_scales(d, first, b, rows)
        for i in range(rows):
            offset[i] += scale[i] * xsum[b]
        for j in range(8):
            x0 = x[c0 + j]
            x8 = x[c0 + 8 + j]
            x16 = x[c0 + 16 + j]
            x24 = x[c0 + 24 + j]
            for i in range(rows):
                r = first + i
                q0, q8, q16, q24 = _q6_codes(
                    np.float32(ql[r, b * HALF + j]), np.float32(ql[r, b * HALF + 8 + j]), np.float32(qh[r, b * 8 + j])
                )
                acc[i, j] += scale[i] * (q0 * x0 + q8 * x8 + q16 * x16 + q24 * x24)
    for i in range(rows):
        out[first + i] = acc[i].sum() - np.float32(32.0) * offset[i] + bias[first + i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_q6_0(ql, qh, d, x, bias, out):
    """out[r] = W[r] @ x + bias[r] for a q6_0 weight: ql uint8 [R, C/2], qh uint8 [R, C/4],
    d uint16 (fp16 bits) [R, C/32]; x [C], bias [R], out [R] float32."""
    n_out = ql.shape[0]
    xsum = _block_sums(x)
    for step in prange((n_out + ROWS - 1) // ROWS):
        first = step * ROWS
        if first + ROWS <= n_out:
            _matvec_rows_q6_0(ql, qh, d, x, xsum, first, ROWS, bias, out)
        else:
            for r in range(first, n_out):
                _matvec_rows_q6_0(ql, qh, d, x, xsum, r, 1, bias, out)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dequantize_rows_q6_0(ql, qh, d, first, r0, rows, out):
    # Codes go through a stack buffer: the 8-lane decode loop only vectorises when it needs no
    # runtime alias checks, which stores straight into `out` would (4.5x slower, measured).
    codes = _stack_zeros(ROWS, QK)
    for b in range(ql.shape[1] // HALF):
        c0 = b * QK
        scale = _f16_scales(d, first + r0, b, rows)
        for j in range(8):
            for i in range(rows):
                r = first + r0 + i
                q0, q8, q16, q24 = _q6_codes(
                    np.float32(ql[r, b * HALF + j]), np.float32(ql[r, b * HALF + 8 + j]), np.float32(qh[r, b * 8 + j])
                )
                codes[i, j] = q0
                codes[i, 8 + j] = q8
                codes[i, 16 + j] = q16
                codes[i, 24 + j] = q24
        for j in range(QK):
            for i in range(rows):
                out[r0 + i, c0 + j] = scale[i] * (codes[i, j] - np.float32(32.0))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dequantize_rows_q6_0(ql, qh, d, first, last, out):
    """out[:last-first] = float32 rows first..last-1 of a q6_0 weight (parts as matvec_q6_0)."""
    n = last - first
    for step in prange((n + ROWS - 1) // ROWS):
        r0 = step * ROWS
        if r0 + ROWS <= n:
            _dequantize_rows_q6_0(ql, qh, d, first, r0, ROWS, out)
        else:
            for r in range(r0, n):
                _dequantize_rows_q6_0(ql, qh, d, first, r, 1, out)


# --- a few tokens at once: each thread widens ROWS rows into a float32 buffer with the format's
# row widening above, and that buffer serves all T tokens (cpu_kernels.rows_times_tokens). The
# drivers are written out per format because Numba's on-disk cache takes neither a kernel that
# receives another kernel as an argument nor a closure over one (both tried: recompiled in every
# process), and compile time on every start would cost more than these few lines. One driver on
# a parts tuple with the widening picked by an `overload` (as repack.matmul_groups dispatches)
# does cache, but measured slower (8 tokens x [8192 x 2048]: q4_m 2.6 -> 6.3 ms; 8.1 ms unless
# the overload is inlined, which trips a Numba internal-consistency warning). ------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_few_q8_0(qs, d, x, bias, out, n_chunks):
    """out [T, R] = x [T, C] @ W.T + bias for a q8_0 weight (parts as matvec_q8_0), reading W once."""
    n_out = qs.shape[0]
    for chunk in prange(n_chunks):
        rows_f32 = np.empty((ROWS, x.shape[1]), np.float32)
        first_step, last_step = thread_chunk(chunk, n_chunks, n_out)
        for step in range(first_step, last_step):
            first = step * ROWS
            n_rows = min(ROWS, n_out - first)
            if n_rows == ROWS:
                _dequantize_rows_q8_0(qs, d, first, 0, ROWS, rows_f32)
            else:
                for r in range(n_rows):
                    _dequantize_rows_q8_0(qs, d, first, r, 1, rows_f32)
            rows_times_tokens(rows_f32, n_rows, x, first, bias, out)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_few_q4_0(qs, d, x, bias, out, n_chunks):
    """out [T, R] = x [T, C] @ W.T + bias for a q4_0 weight (parts as matvec_q4_0), reading W once."""
    n_out = qs.shape[0]
    for chunk in prange(n_chunks):
        rows_f32 = np.empty((ROWS, x.shape[1]), np.float32)
        first_step, last_step = thread_chunk(chunk, n_chunks, n_out)
        for step in range(first_step, last_step):
            first = step * ROWS
            n_rows = min(ROWS, n_out - first)
            if n_rows == ROWS:
                _dequantize_rows_q4_0(qs, d, first, 0, ROWS, rows_f32)
            else:
                for r in range(n_rows):
                    _dequantize_rows_q4_0(qs, d, first, r, 1, rows_f32)
            rows_times_tokens(rows_f32, n_rows, x, first, bias, out)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_few_q4_m(qs, sc, mn, d, dmin, x, bias, out, n_chunks):
    """out [T, R] = x [T, C] @ W.T + bias for a q4_m weight (parts as matvec_q4_m), reading W once."""
    n_out = qs.shape[0]
    for chunk in prange(n_chunks):
        rows_f32 = np.empty((ROWS, x.shape[1]), np.float32)
        first_step, last_step = thread_chunk(chunk, n_chunks, n_out)
        for step in range(first_step, last_step):
            first = step * ROWS
            n_rows = min(ROWS, n_out - first)
            if n_rows == ROWS:
                _dequantize_rows_q4_m(qs, sc, mn, d, dmin, first, 0, ROWS, rows_f32)
            else:
                for r in range(n_rows):
                    _dequantize_rows_q4_m(qs, sc, mn, d, dmin, first, r, 1, rows_f32)
            rows_times_tokens(rows_f32, n_rows, x, first, bias, out)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_few_q6_0(ql, qh, d, x, bias, out, n_chunks):
    """out [T, R] = x [T, C] @ W.T + bias for a q6_0 weight (parts as matvec_q6_0), reading W once."""
    n_out = ql.shape[0]
    for chunk in prange(n_chunks):
        rows_f32 = np.empty((ROWS, x.shape[1]), np.float32)
        first_step, last_step = thread_chunk(chunk, n_chunks, n_out)
        for step in range(first_step, last_step):
            first = step * ROWS
            n_rows = min(ROWS, n_out - first)
            if n_rows == ROWS:
                _dequantize_rows_q6_0(ql, qh, d, first, 0, ROWS, rows_f32)
            else:
                for r in range(n_rows):
                    _dequantize_rows_q6_0(ql, qh, d, first, r, 1, rows_f32)
            rows_times_tokens(rows_f32, n_rows, x, first, bias, out)
