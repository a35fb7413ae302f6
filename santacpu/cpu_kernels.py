"""Numba-compiled CPU kernels: matrix-vector products on fp32/fp16 weights, LayerNorm, GELU, and
causal attention over the single-head (multi-query) KV cache.

Each kernel has a plain-NumPy twin in `reference.py` and is tested against it. Kernels take
preallocated outputs and never allocate per row. All are `cache=True`, so the compile cost is paid
once per machine, not per process.

fp16 weights are passed as their uint16 bits (Numba has no CPU float16 type); `_f16_to_f32`
widens them with LLVM's `fpext half`, which becomes the F16C `vcvtph2ps` instruction.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise the reductions; no `nnan`/`ninf`, since attention relies on
# -inf behaving as -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

LANES = 32  # accumulators per row: wide enough for two AVX2 FMA chains of 8 floats, unrolled


@intrinsic
def _f16_to_f32(typingctx, bits):
    """IEEE half (as uint16 bits) -> float32, exactly."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_f32(weight, x, bias, out):
    """out[r] = weight[r, :] @ x + bias[r]; weight [out, in] float32 C-order, x [in]."""
    n_out, n_in = weight.shape
    n_main = n_in - n_in % LANES
    for r in prange(n_out):
        row = weight[r]
        acc = np.zeros(LANES, np.float32)  # one accumulator per lane, reduced once per row
        for c0 in range(0, n_main, LANES):
            for lane in range(LANES):
                acc[lane] += row[c0 + lane] * x[c0 + lane]
        total = acc.sum()
        for c in range(n_main, n_in):
            total += row[c] * x[c]
        out[r] = total + bias[r]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_f16(weight_bits, x, bias, out):
    """As matvec_f32 for fp16 weights given as uint16 bits; arithmetic in float32."""
    n_out, n_in = weight_bits.shape
    n_main = n_in - n_in % LANES
    for r in prange(n_out):
        row = weight_bits[r]
        acc = np.zeros(LANES, np.float32)
        for c0 in range(0, n_main, LANES):
            for lane in range(LANES):
                acc[lane] += _f16_to_f32(row[c0 + lane]) * x[c0 + lane]
        total = acc.sum()
        for c in range(n_main, n_in):
            total += _f16_to_f32(row[c]) * x[c]
        out[r] = total + bias[r]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def f16_rows_to_f32(weight_bits, first, last, out):
    """out[:last-first] = weight_bits[first:last] widened to float32 (a tile for BLAS prefill)."""
    n_in = weight_bits.shape[1]
    for r in prange(last - first):
        for c in range(n_in):
            out[r, c] = _f16_to_f32(weight_bits[first + r, c])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def layer_norm(x, weight, bias, eps, out):
    """Row-wise LayerNorm of x [T, E] into out [T, E] (two passes: mean, then variance)."""
    T, E = x.shape
    for t in prange(T):
        mean = np.float32(0.0)
        for e in range(E):
            mean += x[t, e]
        mean /= E
        var = np.float32(0.0)
        for e in range(E):
            d = x[t, e] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / E + np.float32(eps))
        for e in range(E):
            out[t, e] = (x[t, e] - mean) * inv * weight[e] + bias[e]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gelu_tanh_inplace(x):
    """x <- 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))) over a 2-D array."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    T, n = x.shape
    for t in prange(T):
        for i in range(n):
            v = x[t, i]
            x[t, i] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(c * (v + np.float32(0.044715) * v * v * v)))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def causal_attention(q, k_cache, v_cache, start, out):
    """Attention of T new queries over the cache, each seeing positions 0..start+t.

    q [T, H, D]; k_cache, v_cache [n_ctx, G, D] with positions 0..start+T-1 already written;
    out [T, H, D]. Query head h reads K/V head h // (H // G): with G = 1 (multi-query) every head
    reads the same single K/V row, which is why the cache keeps one head and not H copies.
    """
    T, H, D = q.shape
    G = k_cache.shape[1]
    group = H // G
    scale = np.float32(1.0 / math.sqrt(D))
    for job in prange(T * H):
        t = job // H
        h = job % H
        g = h // group
        n = start + t + 1
        scores = np.empty(n, np.float32)
        best = np.float32(-np.inf)
        for j in range(n):
            s = np.float32(0.0)
            for d in range(D):
                s += q[t, h, d] * k_cache[j, g, d]
            s *= scale
            scores[j] = s
            best = max(best, s)
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        acc = np.zeros(D, np.float32)
        for j in range(n):
            p = scores[j]
            for d in range(D):
                acc[d] += p * v_cache[j, g, d]
        inv = np.float32(1.0) / total
        for d in range(D):
            out[t, h, d] = acc[d] * inv
