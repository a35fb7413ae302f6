"""Numba-compiled CPU kernels: matrix-vector products on fp16 weights, LayerNorm, GELU, and
causal attention over the single-head (multi-query) KV cache, one sequence's or one token of each of
a batch's sequences. (fp32 weights go to BLAS, which
NumPy already has and which streams them faster than a Numba loop does.)

Each kernel has a plain-NumPy twin in `santacpu/network/reference.py` and is tested against it. Kernels take
preallocated outputs and never allocate per row. All are `cache=True`, so the compile cost is paid
once per machine, not per process.

fp16 weights are passed as their uint16 bits (Numba has no CPU float16 type); `f16_to_f32`
widens them with LLVM's `fpext half`, which becomes the F16C `vcvtph2ps` instruction.

May import: numba, llvmlite, numpy, `santacpu.backends.cpu.isa.llvm_ir` (IR helpers), `santacpu.kernel_cache`.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...kernel_cache import track_kernel_sources
from .isa.llvm_ir import F32, broadcast, declare, literal

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

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


# Keys an attention step widens and scores together: one vector of float32 lanes, a key a lane.
KEY_LANES = 16
# Query heads a tile takes at once: each widened key vector (scores) or value chunk (weighted
# sums) serves them all, and their FMA chains are independent, so they overlap in the FMA units.
HEAD_TILE = 4


def _float_tile_arrays(context, builder, signature, args, which):
    """The data pointers and shapes of the float32 C arrays among an intrinsic's arguments."""
    arrays = {}
    for i in which:
        array = context.make_array(signature.args[i])(context, builder, args[i])
        arrays[i] = (array.data, cgutils.unpack_tuple(builder, array.shape, signature.args[i].ndim))
    return arrays


def _fma(builder, lanes: int):
    vector = ir.VectorType(F32, lanes)
    return declare(builder, f"llvm.fma.v{lanes}f32", vector, vector, vector, vector)


def _vector_at(builder, data, offset, lanes: int):
    return builder.bitcast(builder.gep(data, [offset]), ir.VectorType(ir.FloatType(), lanes).as_pointer())


@intrinsic
def _scores_tile(typingctx, q, t, h, kt, scores, row, j, n_heads):
    """scores[row + i, j : j + KEY_LANES] = K[j : j + KEY_LANES] @ q[t, h + i] for i < n_heads (a
    literal int), with kt float32 [D, KEY_LANES] holding the keys transposed (kt[d, k]: value d
    of key j + k). q [T, H, D], scores [heads, >= j + KEY_LANES], both float32 C arrays. Each
    score is one chain of fused multiply-adds over d in order, whatever the tile's heads."""
    heads, lanes = literal(n_heads), KEY_LANES
    if heads is None:
        return None

    def codegen(context, builder, signature, args):
        arrays = _float_tile_arrays(context, builder, signature, args, (0, 3, 4))
        (q_data, (_, n_head, D)), (kt_data, _), (scores_data, (_, width)) = arrays[0], arrays[3], arrays[4]
        intp = D.type
        t_, h_, row_, j_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 5, 6))
        vector = ir.VectorType(ir.FloatType(), lanes)
        fma = _fma(builder, lanes)
        q_row = builder.mul(builder.add(builder.mul(t_, n_head), h_), D)  # q[t, h, 0]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _ in range(heads)]
        with cgutils.for_range(builder, D) as loop:
            d = loop.index
            keys = builder.load(_vector_at(builder, kt_data, builder.mul(d, ir.Constant(intp, lanes)), lanes), align=4)
            for i in range(heads):
                x = builder.load(builder.gep(q_data, [builder.add(q_row, builder.add(builder.mul(ir.Constant(intp, i), D), d))]))
                builder.store(builder.call(fma, [broadcast(builder, x, lanes), keys, builder.load(accs[i])]), accs[i])
        for i in range(heads):
            at = builder.add(builder.mul(builder.add(row_, ir.Constant(intp, i)), width), j_)
            builder.store(builder.load(accs[i]), _vector_at(builder, scores_data, at, lanes), align=4)
        return context.get_dummy_value()

    return types.void(q, t, h, kt, scores, row, j, n_heads), codegen


@intrinsic
def _values_tile(typingctx, scores, row, j, keys, rows, acc, n_heads):
    """acc[row + i, :] += sum over k < keys of scores[row + i, j + k] * rows[k, :] for i < n_heads
    (a literal int); rows float32 [>= keys, D] (D a multiple of KEY_LANES), acc [heads, D],
    scores [heads, >= j + keys], all float32 C arrays. Each of acc's values is one chain of fused
    multiply-adds over the keys in order, continued from call to call."""
    heads, lanes = literal(n_heads), KEY_LANES
    if heads is None:
        return None

    def codegen(context, builder, signature, args):
        arrays = _float_tile_arrays(context, builder, signature, args, (0, 4, 5))
        (scores_data, (_, width)), (rows_data, (_, D)), (acc_data, _) = arrays[0], arrays[4], arrays[5]
        intp = D.type
        row_, j_, keys_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 3))
        vector = ir.VectorType(ir.FloatType(), lanes)
        fma = _fma(builder, lanes)
        accs = [cgutils.alloca_once(builder, vector) for _ in range(heads)]
        head_rows = [builder.add(row_, ir.Constant(intp, i)) for i in range(heads)]
        with cgutils.for_range(builder, builder.udiv(D, ir.Constant(intp, lanes))) as chunks:
            c = builder.mul(chunks.index, ir.Constant(intp, lanes))
            targets = [_vector_at(builder, acc_data, builder.add(builder.mul(r, D), c), lanes) for r in head_rows]
            for i in range(heads):
                builder.store(builder.load(targets[i], align=4), accs[i])
            with cgutils.for_range(builder, keys_) as loop:
                k = loop.index
                values = builder.load(_vector_at(builder, rows_data, builder.add(builder.mul(k, D), c), lanes), align=4)
                for i in range(heads):
                    p = builder.load(builder.gep(scores_data, [builder.add(builder.mul(head_rows[i], width), builder.add(j_, k))]))
                    builder.store(builder.call(fma, [broadcast(builder, p, lanes), values, builder.load(accs[i])]), accs[i])
            for i in range(heads):
                builder.store(builder.load(accs[i]), targets[i], align=4)
        return context.get_dummy_value()

    return types.void(scores, row, j, keys, rows, acc, n_heads), codegen


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _widen_kv_rows(cache, first, count, g, rows):
    """rows[:count] = cache[first:first+count, g] as float32."""
    for k in range(count):
        for d in range(rows.shape[1]):
            rows[k, d] = _kv_to_f32(cache[first + k, g, d])


def _transpose_square(builder, rows):
    """KEY_LANES vectors <KEY_LANES x float> (a square block's rows) -> its columns, by swapping
    off-diagonal blocks of halving size (KEY_LANES a power of two)."""
    lanes = len(rows)
    rows = list(rows)
    size = lanes // 2
    while size:
        low = [g + o if o < size else lanes + g + o - size for g in range(0, lanes, 2 * size) for o in range(2 * size)]
        high = [g + size + o if o < size else lanes + g + o for g in range(0, lanes, 2 * size) for o in range(2 * size)]
        low_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), low)
        high_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), high)
        for i in range(lanes):
            if (i // size) % 2 == 0:
                a, b = rows[i], rows[i + size]
                rows[i], rows[i + size] = builder.shuffle_vector(a, b, low_mask), builder.shuffle_vector(a, b, high_mask)
        size //= 2
    return rows


@intrinsic
def _widen_keys_transposed(typingctx, cache, first, count, g, kt):
    """kt[d, k] = cache[first + k, g, d] as float32 for k < count (<= KEY_LANES), 0 for the lanes
    past count; cache [n_ctx, G, D] float32 or fp16 bits (uint16), kt float32 [D, KEY_LANES], both
    C arrays. Blocks of KEY_LANES x KEY_LANES values are widened as vectors and transposed in
    registers (a scalar transposing loop cost more than the scores it fed)."""
    if cache.dtype not in (types.uint16, types.float32):
        return None
    half = cache.dtype == types.uint16
    lanes = KEY_LANES

    def codegen(context, builder, signature, args):
        cache_array = context.make_array(signature.args[0])(context, builder, args[0])
        kt_array = context.make_array(signature.args[4])(context, builder, args[4])
        _, G, D = cgutils.unpack_tuple(builder, cache_array.shape, 3)
        intp = D.type
        first_, count_, g_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 3))
        vector = ir.VectorType(ir.FloatType(), lanes)
        stored = ir.VectorType(ir.HalfType() if half else ir.FloatType(), lanes)
        data = builder.bitcast(cache_array.data, ir.HalfType().as_pointer()) if half else cache_array.data
        whole = builder.mul(builder.udiv(D, ir.Constant(intp, lanes)), ir.Constant(intp, lanes))
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), whole, ir.Constant(intp, lanes)) as (c, _):
            rows = []
            for k in range(lanes):  # keys past count: key `first` loaded (it exists), then zeroed
                present = builder.icmp_signed("<", ir.Constant(intp, k), count_)
                key = builder.add(first_, builder.select(present, ir.Constant(intp, k), ir.Constant(intp, 0)))
                at = builder.add(builder.mul(builder.add(builder.mul(key, G), g_), D), c)
                loaded = builder.load(builder.bitcast(builder.gep(data, [at]), stored.as_pointer()), align=2 if half else 4)
                widened = builder.fpext(loaded, vector) if half else loaded
                rows.append(builder.select(present, widened, ir.Constant(vector, None)))
            for i, column in enumerate(_transpose_square(builder, rows)):
                target = builder.gep(kt_array.data, [builder.mul(builder.add(c, ir.Constant(intp, i)), ir.Constant(intp, lanes))])
                builder.store(column, builder.bitcast(target, vector.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(cache, first, count, g, kt), codegen


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _widen_keys_rest(cache, first, count, g, kt):
    """The values past D's last whole block of KEY_LANES (none where D = 128) of _widen_keys_transposed."""
    for d in range(kt.shape[0] - kt.shape[0] % KEY_LANES, kt.shape[0]):
        for k in range(count):
            kt[d, k] = _kv_to_f32(cache[first + k, g, d])
        for k in range(count, KEY_LANES):
            kt[d, k] = np.float32(0.0)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _attend_heads(q, k_cache, v_cache, t0, n_tokens, start, g, h0, scale, scores, rows, acc, out):
    """out[t, h] = softmax(K[:n_t] @ q[t, h] * scale) @ V[:n_t] (n_t = start + t + 1) for the
    queries t0 .. t0 + n_tokens - 1 and heads h0 .. h0 + heads - 1, which all read K/V head g.

    Each K and V row is widened once (keys transposed, KEY_LANES at a time) and serves all these
    queries' heads, HEAD_TILE heads at a time through the explicit vector tiles `_scores_tile` /
    `_values_tile`: every score and every output value is one chain of fused multiply-adds in a
    fixed order, so a query's result never depends on the queries beside it. scores [n_tokens *
    heads, >= n_last rounded up to KEY_LANES] (row tt * heads + hh), rows [KEY_LANES, D] (also
    the transposed keys, as [D, KEY_LANES]), acc [n_tokens * heads, D] are scratch, float32 C."""
    heads, D = acc.shape[0] // n_tokens, q.shape[2]
    whole = heads - heads % HEAD_TILE
    n_last = start + t0 + n_tokens
    kt = rows.reshape(D, KEY_LANES)
    for j in range(0, n_last, KEY_LANES):
        _widen_keys_transposed(k_cache, j, min(KEY_LANES, n_last - j), g, kt)
        _widen_keys_rest(k_cache, j, min(KEY_LANES, n_last - j), g, kt)
        for tt in range(n_tokens):
            if start + t0 + tt + 1 <= j:  # this query sees none of these keys
                continue
            for hh in range(0, whole, HEAD_TILE):
                _scores_tile(q, t0 + tt, h0 + hh, kt, scores, tt * heads + hh, j, HEAD_TILE)
            for hh in range(whole, heads):
                _scores_tile(q, t0 + tt, h0 + hh, kt, scores, tt * heads + hh, j, 1)
    for tt in range(n_tokens):
        for hh in range(heads):
            _softmax_prefix(scores[tt * heads + hh], start + t0 + tt + 1, scale)
            for d in range(D):
                acc[tt * heads + hh, d] = np.float32(0.0)
    for j in range(0, n_last, KEY_LANES):
        _widen_kv_rows(v_cache, j, min(KEY_LANES, n_last - j), g, rows)
        for tt in range(n_tokens):
            keys = min(KEY_LANES, start + t0 + tt + 1 - j)
            if keys <= 0:
                continue
            first = tt * heads
            for hh in range(0, whole, HEAD_TILE):
                _values_tile(scores, first + hh, j, keys, rows, acc, HEAD_TILE)
            for hh in range(whole, heads):
                _values_tile(scores, first + hh, j, keys, rows, acc, 1)
            for hh in range(first, first + heads):  # the values past D's last whole vector (none where D = 128)
                for k in range(keys):
                    p = scores[hh, j + k]
                    for d in range(D - D % KEY_LANES, D):
                        acc[hh, d] += p * rows[k, d]
    for tt in range(n_tokens):
        for hh in range(heads):
            for d in range(D):
                out[t0 + tt, h0 + hh, d] = acc[tt * heads + hh, d]


# Consecutive queries of a prompt that share one job: the keys and values they widen serve them all.
QUERY_TILE = 4


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def causal_attention(q, k_cache, v_cache, start, out, head_splits):
    """Attention of T new queries over the cache, each seeing positions 0..start+t.

    q [T, H, D] float32; k_cache, v_cache [n_ctx, G, D], float32 or fp16 bits (uint16), with
    positions 0..start+T-1 already written; out [T, H, D] float32. Query head h reads K/V head
    h // (H // G): with G = 1 (multi-query) every head reads the same single K/V row, which is why
    the cache keeps one head and not H copies, and why each row is read once for all heads.
    The jobs are (QUERY_TILE consecutive queries, K/V head, part): `head_splits` > 1 splits each
    group's heads into that many parts, so one decode token (a single job otherwise) can use
    several threads. A query's output does not depend on T, start, head_splits or the queries
    sharing its job (one query's arithmetic, whoever runs it), so a prompt, a few-token pass and
    decoding give each position the same bits. Jobs alternate between the first and the last
    queries, so the threads' contiguous shares of the job range hold as many keys each (a
    prompt's late queries see far more keys than its early ones).
    """
    T, H, D = q.shape
    G = k_cache.shape[1]
    group = H // G
    per_part = (group + head_splits - 1) // head_splits
    scale = np.float32(1.0 / math.sqrt(D))
    n_tiles = (T + QUERY_TILE - 1) // QUERY_TILE
    for job in prange(n_tiles * G * head_splits):
        i, rest = job // (G * head_splits), job % (G * head_splits)
        tile = i // 2 if i % 2 == 0 else n_tiles - 1 - i // 2
        g, part = rest // head_splits, rest % head_splits
        first = part * per_part
        heads = min(per_part, group - first)
        if heads <= 0:
            continue
        t0 = tile * QUERY_TILE
        n_tokens = min(QUERY_TILE, T - t0)
        n_last = start + t0 + n_tokens
        scores = np.empty((n_tokens * heads, (n_last + KEY_LANES - 1) // KEY_LANES * KEY_LANES), np.float32)
        rows = np.empty((KEY_LANES, D), np.float32)
        acc = np.empty((n_tokens * heads, D), np.float32)
        _attend_heads(q, k_cache, v_cache, t0, n_tokens, start, g, g * group + first, scale, scores, rows, acc, out)


@intrinsic
def _address_as_pointer(typingctx, address, like):
    """An integer address as a pointer to the element type of the array `like` (for `carray`)."""
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(types.int64, like), codegen


@intrinsic
def _as_cache_value(typingctx, value, like):
    """A float32 as the KV cache `like` stores it: IEEE half bits (uint16, `fptrunc`: rounded to
    nearest even, as NumPy's float32 -> float16) or the float32 itself."""
    if like.dtype == types.uint16:

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return types.uint16(types.float32, like), codegen

    def same(context, builder, signature, args):
        return args[0]

    return types.float32(types.float32, like), same


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def attention_of_tokens(qkv, rows, k_addresses, v_addresses, capacities, starts, like, out, head_splits, G, D):
    """One new token of each of B sequences, each with a KV cache of its own: sequence b's token
    is row rows[b] of qkv [T, E + 2*G*D] (Q, then K, then V), at position starts[b] of the layer
    cache whose K and V [capacities[b], G, D] (float32 or fp16 bits, as `like`) start at the
    addresses k_addresses[b], v_addresses[b] (C-contiguous arrays the caller holds). Stores each
    token's K/V row, then writes its attention into out[rows[b]] (out [T, E] float32).

    One parallel region for the batch, where a call of `causal_attention` per sequence started one
    each (a decode step of 16 sequences: 384 of them). Each sequence's result is the same
    `_attend_heads` arithmetic as `causal_attention` for it alone, to the bit: its query is row b
    of a [B, H, D] copy, at position (starts[b] - b) + b."""
    B = rows.shape[0]
    H = out.shape[1] // D
    E = H * D
    q = np.empty((B, H, D), np.float32)
    result = np.empty((B, H, D), np.float32)
    for b in range(B):  # the K/V rows first: every job of a sequence reads its own token's
        k = carray(_address_as_pointer(k_addresses[b], like), (capacities[b], G, D))
        v = carray(_address_as_pointer(v_addresses[b], like), (capacities[b], G, D))
        r = rows[b]
        for g in range(G):
            for d in range(D):
                k[starts[b], g, d] = _as_cache_value(qkv[r, E + g * D + d], like)
                v[starts[b], g, d] = _as_cache_value(qkv[r, E + G * D + g * D + d], like)
        for h in range(H):
            for d in range(D):
                q[b, h, d] = qkv[r, h * D + d]
    group = H // G
    per_part = (group + head_splits - 1) // head_splits
    scale = np.float32(1.0 / math.sqrt(D))
    for job in prange(B * G * head_splits):
        b, rest = job // (G * head_splits), job % (G * head_splits)
        g, part = rest // head_splits, rest % head_splits
        first = part * per_part
        heads = min(per_part, group - first)
        if heads <= 0:
            continue
        k = carray(_address_as_pointer(k_addresses[b], like), (capacities[b], G, D))
        v = carray(_address_as_pointer(v_addresses[b], like), (capacities[b], G, D))
        n_last = starts[b] + 1
        scores = np.empty((heads, (n_last + KEY_LANES - 1) // KEY_LANES * KEY_LANES), np.float32)
        work = np.empty((KEY_LANES, D), np.float32)
        acc = np.empty((heads, D), np.float32)
        _attend_heads(q, k, v, b, 1, starts[b] - b, g, g * group + first, scale, scores, work, acc, result)
    for b in range(B):
        for h in range(H):
            for d in range(D):
                out[rows[b], h * D + d] = result[b, h, d]
