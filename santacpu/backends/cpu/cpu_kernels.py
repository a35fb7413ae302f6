"""Numba-compiled CPU kernels: matrix-vector products on fp16 weights, LayerNorm, GELU, and
causal attention over the single-head (multi-query) KV cache. (fp32 weights go to BLAS, which
NumPy already has and which streams them faster than a Numba loop does.)

Each kernel has a plain-NumPy twin in `santacpu/network/reference.py` and is tested against it. Kernels take
preallocated outputs and never allocate per row. All are `cache=True`, so the compile cost is paid
once per machine, not per process.

fp16 weights are passed as their uint16 bits (Numba has no CPU float16 type); `f16_to_f32`
widens them with LLVM's `fpext half`, which becomes the F16C `vcvtph2ps` instruction.

May import: numba, llvmlite, numpy.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise the reductions; no `nnan`/`ninf`, since attention relies on
# -inf behaving as -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

ROWS = 4  # rows per matvec / few-token step: each loaded x value serves 4 rows (the sums
# written out for 4 in matvec_f16 and rows_times_tokens)


def _widen_half_codegen(context, builder, signature, args):
    """LLVM for IEEE half bits (uint16) -> float32: `fpext half`, the F16C `vcvtph2ps`."""
    return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())


@intrinsic
def f16_to_f32(typingctx, bits):
    """IEEE half (as uint16 bits) -> float32, exactly."""
    return types.float32(types.uint16), _widen_half_codegen


@intrinsic
def _stack_zeros(typingctx, n_rows, n_cols):
    """A zeroed float32 [n_rows, n_cols] C array in the calling function's stack frame (sizes
    must be compile-time constants). It must not outlive the call, so never return it."""
    if not isinstance(n_rows, types.IntegerLiteral) or not isinstance(n_cols, types.IntegerLiteral):
        return None
    rows, cols = n_rows.literal_value, n_cols.literal_value
    array_type = types.Array(types.float32, 2, "C")

    def codegen(context, builder, signature, args):
        storage_type = ir.ArrayType(ir.FloatType(), rows * cols)
        storage = cgutils.alloca_once(builder, storage_type)  # in the entry block: one per frame
        builder.store(ir.Constant(storage_type, None), storage)  # zeroed at every call site
        intp = context.get_value_type(types.intp)
        array = context.make_array(array_type)(context, builder)
        context.populate_array(
            array,
            data=builder.bitcast(storage, ir.FloatType().as_pointer()),
            shape=[ir.Constant(intp, rows), ir.Constant(intp, cols)],
            strides=[ir.Constant(intp, cols * 4), ir.Constant(intp, 4)],
            itemsize=ir.Constant(intp, 4),
            meminfo=None,
        )
        return array._getvalue()

    return array_type(n_rows, n_cols), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to fetch the cache line holding element `index` of a C-contiguous array (a
    flat index) into the L2 cache. A hint only: it never faults, whatever the address."""
    sig = types.none(array, types.intp)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch_type = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        prefetch = cgutils.get_or_insert_function(builder.module, prefetch_type, "llvm.prefetch.p0i8")
        # (address, read, locality 2 = into L2 (prefetcht1), data cache). Into L1 (3) was slower on
        # this machine: a decode pass over the full q8_0 model 62-64 ms against 58-60 ms.
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_f16(weight_bits, x, bias, out):
    """out[r] = weight[r, :] @ x + bias[r] for fp16 weights given as uint16 bits [out, in];
    arithmetic in float32.

    Rows go ROWS at a time so each loaded x[c] serves several rows, each row with one running sum
    over the whole row that LLVM's loop vectoriser (with reassociation) turns into interleaved
    vector accumulators. (16 explicit lanes per row were fully unrolled and left scalar, since
    Numba runs no SLP vectoriser: 4.4 GB/s from DRAM on one thread, against 14.1 GB/s now.)
    """
    n_out, n_in = weight_bits.shape
    for step in prange((n_out + ROWS - 1) // ROWS):
        first = step * ROWS
        if first + ROWS <= n_out:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for c in range(n_in):
                xc = x[c]
                s0 += f16_to_f32(weight_bits[first, c]) * xc
                s1 += f16_to_f32(weight_bits[first + 1, c]) * xc
                s2 += f16_to_f32(weight_bits[first + 2, c]) * xc
                s3 += f16_to_f32(weight_bits[first + 3, c]) * xc
            out[first] = s0 + bias[first]
            out[first + 1] = s1 + bias[first + 1]
            out[first + 2] = s2 + bias[first + 2]
            out[first + 3] = s3 + bias[first + 3]
        else:
            for r in range(first, n_out):
                total = np.float32(0.0)
                for c in range(n_in):
                    total += f16_to_f32(weight_bits[r, c]) * x[c]
                out[r] = total + bias[r]


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _widen_row_f16(weight_bits, row, out_row):
    """out_row [C] = row `row` of fp16 weight bits [R, C], widened to float32."""
    for c in range(weight_bits.shape[1]):
        out_row[c] = f16_to_f32(weight_bits[row, c])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def f16_rows_to_f32(weight_bits, first, last, out):
    """out[:last-first] = weight_bits[first:last] widened to float32 (a tile for BLAS prefill)."""
    for r in prange(last - first):
        _widen_row_f16(weight_bits, first + r, out[r])


# --- a few tokens at once (T = 2..7: speculative verification, short prompts) ----------------
# The weight is widened ROWS rows at a time into a small per-thread float32 buffer (by the
# caller's format-specific widening), which then serves every token: the compressed weight is
# read once per call instead of once per token. A decode-sized pass costs ~1 matvec pass plus
# T x the float work on cache-resident rows.


@njit(fastmath=FASTMATH, cache=True, inline="always")
def rows_times_tokens(rows_f32, n_rows, x, first, bias, out):
    """out[t, first + i] = rows_f32[i] @ x[t] + bias[first + i] for i < n_rows and every token t:
    rows_f32 [ROWS, C] float32 (rows past n_rows are ignored), x [T, C], out [T, R].

    One long loop over C with one running sum per row: with reassociation LLVM's loop vectoriser
    turns each sum into interleaved vector accumulators. (A 16-lane inner loop per row, by
    contrast, is fully unrolled and then left scalar, since Numba runs no SLP vectoriser: 6.5x
    slower, measured.)"""
    for t in range(x.shape[0]):
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for c in range(x.shape[1]):
            xc = x[t, c]
            s0 += rows_f32[0, c] * xc
            s1 += rows_f32[1, c] * xc
            s2 += rows_f32[2, c] * xc
            s3 += rows_f32[3, c] * xc
        sums = (s0, s1, s2, s3)  # ROWS = 4 written out
        for i in range(n_rows):
            out[t, first + i] = sums[i] + bias[first + i]


@njit(cache=True, inline="always")
def thread_chunk(chunk, n_chunks, n_out):
    """Row steps (of ROWS rows) [first, last) of chunk `chunk` out of n_chunks, for R = n_out."""
    n_steps = (n_out + ROWS - 1) // ROWS
    return chunk * n_steps // n_chunks, (chunk + 1) * n_steps // n_chunks


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_few_f16(weight_bits, x, bias, out, n_chunks):
    """out [T, R] = x [T, C] @ W.T + bias for fp16 weight bits [R, C], reading W once."""
    n_out = weight_bits.shape[0]
    for chunk in prange(n_chunks):
        rows_f32 = np.empty((ROWS, x.shape[1]), np.float32)
        first_step, last_step = thread_chunk(chunk, n_chunks, n_out)
        for step in range(first_step, last_step):
            first = step * ROWS
            n_rows = min(ROWS, n_out - first)
            for i in range(n_rows):
                _widen_row_f16(weight_bits, first + i, rows_f32[i])
            rows_times_tokens(rows_f32, n_rows, x, first, bias, out)


# LayerNorm, GELU and attention are parallel over rows/jobs; the backend runs small calls on the
# calling thread alone (the _serial twins, or numba.set_num_threads(1)), see
# backend.PARALLEL_MIN_WORK for why.


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _layer_norm_row(x, weight, bias, eps, out):
    n = x.shape[0]
    mean = np.float32(0.0)
    for e in range(n):
        mean += x[e]
    mean /= n
    var = np.float32(0.0)
    for e in range(n):
        d = x[e] - mean
        var += d * d
    inv = np.float32(1.0) / np.sqrt(var / n + eps)
    for e in range(n):
        out[e] = (x[e] - mean) * inv * weight[e] + bias[e]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def layer_norm(x, weight, bias, eps, out):
    """Row-wise LayerNorm of x [T, E] into out [T, E] (two passes: mean, then variance)."""
    for t in prange(x.shape[0]):
        _layer_norm_row(x[t], weight, bias, eps, out[t])


# The _serial twins are functions of their own, so that each is cached on disk by itself (Numba
# keys its cache by function and signature, not by compile options).
@njit(fastmath=FASTMATH, cache=True)
def layer_norm_serial(x, weight, bias, eps, out):
    """layer_norm on the calling thread only (no thread pool to start)."""
    for t in range(x.shape[0]):
        _layer_norm_row(x[t], weight, bias, eps, out[t])


@intrinsic
def _pow2_int(typingctx, n):
    """2**n for a float32 n that holds an integer in [-126, 127], built from its exponent bits:
    pure integer/bit operations, so a loop calling it vectorises (libm's exp/tanh do not)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return sig, codegen


# 2**f on [-1/2, 1/2]: a relative-error least-squares fit of degree 6 (made for this module;
# max relative error 1e-7 in float32 arithmetic, measured on 20001 points).
_EXP2_POLY = (1.0, 0.693147205, 0.240226469, 0.0555032979, 0.00961848939, 0.00133995596, 0.000153448465)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _exp2(z):
    """2**z for float32 z, relative error ~1e-7; saturates to 2**-126 / 2**126 outside that range."""
    z = min(max(z, np.float32(-126.0)), np.float32(126.0))
    n = np.floor(z + np.float32(0.5))
    f = z - n
    c = _EXP2_POLY
    p = np.float32(c[6])
    p = p * f + np.float32(c[5])
    p = p * f + np.float32(c[4])
    p = p * f + np.float32(c[3])
    p = p * f + np.float32(c[2])
    p = p * f + np.float32(c[1])
    p = p * f + np.float32(c[0])
    return p * _pow2_int(n)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _gelu_tanh_row(x):
    # 0.5 * (1 + tanh(u)) == 1 / (1 + exp(-2u)): one vectorisable exp2 instead of a scalar libm
    # tanh (which made GELU ~25% of prefill), and no cancellation for very negative inputs.
    minus_2c_log2e = np.float32(-2.0 * math.sqrt(2.0 / math.pi) / math.log(2.0))
    for i in range(x.shape[0]):
        v = x[i]
        u = v + np.float32(0.044715) * v * v * v
        x[i] = v / (np.float32(1.0) + _exp2(minus_2c_log2e * u))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gelu_tanh_inplace(x):
    """x <- 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))) over a 2-D array [T, n]."""
    for t in prange(x.shape[0]):
        _gelu_tanh_row(x[t])


@njit(fastmath=FASTMATH, cache=True)
def gelu_tanh_inplace_serial(x):
    """gelu_tanh_inplace on the calling thread only."""
    for t in range(x.shape[0]):
        _gelu_tanh_row(x[t])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gelu_tanh_split(row, n_parts):
    """gelu_tanh_inplace of one row [n], cut into n_parts contiguous parts run in parallel."""
    n = row.shape[0]
    per = (n + n_parts - 1) // n_parts
    for part in prange(n_parts):
        _gelu_tanh_row(row[part * per : min(n, (part + 1) * per)])


@intrinsic
def _kv_to_f32(typingctx, value):
    """A KV cache element as float32: fp16 bits (uint16) widened exactly, float32 unchanged."""
    if value == types.uint16:
        return types.float32(value), _widen_half_codegen
    if value == types.float32:
        return types.float32(value), lambda context, builder, signature, args: args[0]
    return None


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _softmax_prefix(row, n, scale):
    """row[:n] <- softmax(scale * row[:n]) in place, with the vectorised exp2 (no scalar libm
    call); row[n:] is left alone."""
    best = np.float32(-np.inf)
    for j in range(n):
        best = max(best, row[j])
    scale_log2e = scale * np.float32(1.0 / math.log(2.0))
    total = np.float32(0.0)
    for j in range(n):
        e = _exp2((row[j] - best) * scale_log2e)
        row[j] = e
        total += e
    inv = np.float32(1.0) / total
    for j in range(n):
        row[j] *= inv


# Keys (and values) an attention step widens and uses together. Each score is still its own dot
# product over D, but a step's KEYS_PER_STEP dot products run side by side (independent sums that
# keep the FMA units busy), and a step's weighted value rows are summed first and then added to
# the accumulator, so one load and store of it serves them all. One layer's decode attention
# over 2000 positions on one thread, K.q / the values' weighted sum: 179 / 209 us a key at a time,
# 133 / 130 for 4 keys a step, 120 / 115 for 8.
KEYS_PER_STEP = 8


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _widen_kv_rows(cache, first, count, g, rows):
    """rows[:count] = cache[first:first+count, g] as float32."""
    for k in range(count):
        for d in range(rows.shape[1]):
            rows[k, d] = _kv_to_f32(cache[first + k, g, d])


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _attend_heads(q, k_cache, v_cache, t, g, h0, n, scale, scores, rows, acc, out):
    """out[t, h] = softmax(K[:n] @ q[t, h] * scale) @ V[:n] for query heads h0 .. h0 + len(scores)
    - 1, which all read K/V head g.

    Each K and V row is widened once into `rows` and serves all these heads (all 16 for
    multi-query on one thread), instead of being re-read per head; KEYS_PER_STEP rows at a time.
    scores [heads, >= n], rows [KEYS_PER_STEP, D], acc [heads, D] are scratch. (The caches are
    indexed whole rather than sliced to [:, g]: a strided slice would stop LLVM from vectorising
    the inner loops.)"""
    heads, D = scores.shape[0], q.shape[2]
    for j in range(0, n, KEYS_PER_STEP):
        keys = min(KEYS_PER_STEP, n - j)
        _widen_kv_rows(k_cache, j, keys, g, rows)
        if keys == KEYS_PER_STEP:
            for hh in range(heads):
                sums = _stack_zeros(1, KEYS_PER_STEP)[0]  # in registers: the key loop unrolls
                for d in range(D):
                    x = q[t, h0 + hh, d]
                    for k in range(KEYS_PER_STEP):
                        sums[k] += x * rows[k, d]
                for k in range(KEYS_PER_STEP):
                    scores[hh, j + k] = sums[k]
        else:  # the last keys
            for hh in range(heads):
                for k in range(keys):
                    s = np.float32(0.0)
                    for d in range(D):
                        s += q[t, h0 + hh, d] * rows[k, d]
                    scores[hh, j + k] = s
    for hh in range(heads):
        _softmax_prefix(scores[hh], n, scale)
        for d in range(D):
            acc[hh, d] = np.float32(0.0)
    for j in range(0, n, KEYS_PER_STEP):
        keys = min(KEYS_PER_STEP, n - j)
        _widen_kv_rows(v_cache, j, keys, g, rows)
        if keys == KEYS_PER_STEP:
            for hh in range(heads):
                for d in range(D):
                    total = np.float32(0.0)
                    for k in range(KEYS_PER_STEP):
                        total += scores[hh, j + k] * rows[k, d]
                    acc[hh, d] += total
        else:
            for hh in range(heads):
                for k in range(keys):
                    p = scores[hh, j + k]
                    for d in range(D):
                        acc[hh, d] += p * rows[k, d]
    for hh in range(heads):
        for d in range(D):
            out[t, h0 + hh, d] = acc[hh, d]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def causal_attention(q, k_cache, v_cache, start, out, head_splits):
    """Attention of T new queries over the cache, each seeing positions 0..start+t.

    q [T, H, D] float32; k_cache, v_cache [n_ctx, G, D], float32 or fp16 bits (uint16), with
    positions 0..start+T-1 already written; out [T, H, D] float32. Query head h reads K/V head
    h // (H // G): with G = 1 (multi-query) every head reads the same single K/V row, which is why
    the cache keeps one head and not H copies, and why each row is read once for all heads.
    The jobs are (token, K/V head, part): `head_splits` > 1 splits each group's heads into that
    many parts, so one decode token (a single job otherwise) can use several threads. A token's
    output does not depend on T, start or head_splits (one query's arithmetic, whoever runs it),
    so a prompt, a few-token pass and decoding give each position the same bits. Jobs alternate
    between the first and the last tokens, so the threads' contiguous shares of the job range
    hold as many keys each (a prompt's late queries see far more keys than its early ones).
    """
    T, H, D = q.shape
    G = k_cache.shape[1]
    group = H // G
    per_part = (group + head_splits - 1) // head_splits
    scale = np.float32(1.0 / math.sqrt(D))
    for job in prange(T * G * head_splits):
        i, rest = job // (G * head_splits), job % (G * head_splits)
        t = i // 2 if i % 2 == 0 else T - 1 - i // 2
        g, part = rest // head_splits, rest % head_splits
        first = part * per_part
        heads = min(per_part, group - first)
        if heads <= 0:
            continue
        n = start + t + 1
        scores = np.empty((heads, n), np.float32)
        rows = np.empty((KEYS_PER_STEP, D), np.float32)
        acc = np.empty((heads, D), np.float32)
        _attend_heads(q, k_cache, v_cache, t, g, g * group + first, n, scale, scores, rows, acc, out)
