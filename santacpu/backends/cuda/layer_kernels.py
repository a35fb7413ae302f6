"""The kernels of a forward pass other than the matrix products: embedding lookups, LayerNorm,
storing K/V rows into the cache, causal multi-query attention, and a copy kernel (the yardstick
for the device's memory bandwidth in `santacpu bench --device cuda`).

The KV cache is `[n_layer, n_ctx, G, D]` for K and for V, float32 or fp16 bits (uint16): one K/V
head serves every query head (multi-query), so attention reads each cached row once per query
token for all H heads.

Shapes: T = tokens in the call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.

May import: numba, numpy, `santacpu.backends.cuda.values`.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32

from .values import block_sum, float_to_half, half_to_float, value

MAX_NORM_THREADS = 256
# Attention's compile-time limits (shared-memory sizes must be constants): 43 KB of shared memory.
CHUNK = 32  # positions staged at once
MAX_HEAD_DIM = 128
_K_STRIDE = 129  # MAX_HEAD_DIM + 1
MAX_HEADS = 16
MAX_WIDTH = 2048  # n_head * head_dim
MAX_OWNED = 8  # outputs a thread: MAX_WIDTH / (threads a block) at most


@cuda.jit(cache=True)
def embed(fmt, p0, p1, p2, p3, p4, rows, accumulate, out):
    """out [T, E] = (out +) table[rows[t]] for every t: the token rows, then the positions."""
    i = cuda.grid(1)
    n_tokens, width = out.shape
    if i < n_tokens * width:
        t = i // width
        column = i - t * width
        v = value(fmt, p0, p1, p2, p3, p4, rows[t], column)
        out[t, column] = out[t, column] + v if accumulate else v


@cuda.jit(cache=True)
def layer_norm(x, weight, bias, eps, out):
    """One block per row of x [T, E]: mean, then variance of (x - mean), as the reference does."""
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x  # a power of two
    width = x.shape[1]
    sums = cuda.shared.array(MAX_NORM_THREADS, float32)
    s = float32(0.0)
    for i in range(tid, width, n):
        s += x[t, i]
    sums[tid] = s
    mean = block_sum(sums, tid, n) / float32(width)
    s = float32(0.0)
    for i in range(tid, width, n):
        d = x[t, i] - mean
        s += d * d
    sums[tid] = s
    denominator = math.sqrt(block_sum(sums, tid, n) / float32(width) + eps)
    for i in range(tid, width, n):
        out[t, i] = (x[t, i] - mean) / denominator * weight[i] + bias[i]


@cuda.jit(cache=True)
def store_kv(qkv, n_tokens, q_width, k_cache, v_cache, layer, positions, index, half):
    """Rows of qkv [T, E + 2*G*D] (after Q: K, then V) into the caches at positions start..,
    start = positions[index] (device memory: see `attention`)."""
    i = cuda.grid(1)
    start = positions[index]
    heads, dim = k_cache.shape[2], k_cache.shape[3]
    kv_width = heads * dim
    if i < n_tokens * kv_width:
        t = i // kv_width
        j = i - t * kv_width
        g = j // dim
        d = j - g * dim
        k = qkv[t, q_width + j]
        v = qkv[t, q_width + kv_width + j]
        if half:
            k_cache[layer, start + t, g, d] = float_to_half(k)
            v_cache[layer, start + t, g, d] = float_to_half(v)
        else:
            k_cache[layer, start + t, g, d] = k
            v_cache[layer, start + t, g, d] = v


@cuda.jit(device=True, inline=True)
def _cached(cache, half, layer, position, head, d):
    return half_to_float(cache[layer, position, head, d]) if half else float32(cache[layer, position, head, d])


@cuda.jit(device=True, inline=True)
def _rounded(value, half):
    """value as the cache gives it back: through fp16 where the cache is fp16."""
    return half_to_float(float_to_half(value)) if half else value


@cuda.jit(cache=True)
def attention(qkv, k_cache, v_cache, layer, positions, index, store, half, n_head, scale, chunks_per_split, out,
              part_acc, part_max, part_sum, done):
    """Causal multi-query attention, one block per (query token t, split s of its positions).

    The call's first position, start, is positions[index], read from device memory (a decode
    step's position is written there before the step, so a captured step replays at any
    position); the grid may cover more positions than start + T (a decode step's grid follows
    its context length's bucket): splits past them find no chunk, and contribute nothing.

    Positions come in chunks of CHUNK: each chunk's K and V rows (every head's) are staged in
    shared memory once and serve all of a K/V head's query heads, which keep a running softmax
    (max, sum, weighted sum of V) across the split's chunks. With one split a token (long
    prompts: enough blocks already) the block writes out [T, E] itself; with several (decode: a
    token's positions spread over the GPU) it writes its partial sums, and the last of token t's
    blocks to finish (counted in done[t], which it sets back to 0) adds them up into out[t]
    (`_combine`): no launch of its own. q is qkv[t, :E] as [H, D]; rows of qkv after E are K
    and V.

    With `store` (decode steps: one launch fewer a layer), the call's own K/V rows are not yet
    in the cache: blocks (t, split 0) write row t into it, and every block reads positions from
    start on from qkv instead, rounded as the cache rounds them (fp16). Without it `store_kv`
    has stored them already."""
    t = cuda.blockIdx.x
    split = cuda.blockIdx.y
    n_splits = cuda.gridDim.y
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    n_kv = k_cache.shape[2]
    dim = k_cache.shape[3]
    group = n_head // n_kv
    width = n_head * dim
    k_tile = cuda.shared.array((CHUNK, _K_STRIDE), float32)  # +1 a row: lanes reading one d, many p, hit distinct banks
    v_tile = cuda.shared.array((CHUNK, MAX_HEAD_DIM), float32)
    q = cuda.shared.array(MAX_WIDTH, float32)
    weights = cuda.shared.array((MAX_HEADS, CHUNK), float32)
    running_max = cuda.shared.array(MAX_HEADS, float32)
    running_sum = cuda.shared.array(MAX_HEADS, float32)
    correction = cuda.shared.array(MAX_HEADS, float32)
    last = cuda.shared.array(1, int32)  # whether this block is its token's last to finish
    acc = cuda.local.array(MAX_OWNED, float32)  # this thread's outputs: flat index tid + k * threads
    for k in range(MAX_OWNED):
        acc[k] = 0.0
    for i in range(tid, width, threads):
        q[i] = qkv[t, i]
    for h in range(tid, n_head, threads):
        running_max[h] = float32(-math.inf)
        running_sum[h] = 0.0
    start = positions[index]
    n_positions = start + t + 1
    q_width = width  # K's first column in qkv (after Q)
    kv_width = n_kv * dim
    if store and split == 0:
        for i in range(tid, kv_width, threads):
            g = i // dim
            d = i - g * dim
            k = qkv[t, q_width + i]
            v = qkv[t, q_width + kv_width + i]
            if half:
                k_cache[layer, start + t, g, d] = float_to_half(k)
                v_cache[layer, start + t, g, d] = float_to_half(v)
            else:
                k_cache[layer, start + t, g, d] = k
                v_cache[layer, start + t, g, d] = v
    first_chunk = split * chunks_per_split
    last_chunk = min(first_chunk + chunks_per_split, (n_positions + CHUNK - 1) // CHUNK)
    cuda.syncthreads()
    for g in range(n_kv):
        h0 = g * group
        for chunk in range(first_chunk, last_chunk):
            p0 = chunk * CHUNK
            for i in range(tid, CHUNK * dim, threads):  # stage the chunk's K and V rows
                p = i // dim
                d = i - p * dim
                if store and p0 + p >= start and p0 + p < n_positions:  # this call's row: from qkv
                    column = q_width + g * dim + d
                    k_tile[p, d] = _rounded(qkv[p0 + p - start, column], half)
                    v_tile[p, d] = _rounded(qkv[p0 + p - start, column + kv_width], half)
                elif p0 + p < n_positions:
                    k_tile[p, d] = _cached(k_cache, half, layer, p0 + p, g, d)
                    v_tile[p, d] = _cached(v_cache, half, layer, p0 + p, g, d)
                else:
                    k_tile[p, d] = 0.0
                    v_tile[p, d] = 0.0
            cuda.syncthreads()
            for i in range(tid, group * CHUNK, threads):  # scores
                hh = i // CHUNK
                p = i - hh * CHUNK
                score = float32(-math.inf)
                if p0 + p < n_positions:
                    dot = float32(0.0)
                    base = (h0 + hh) * dim
                    for d in range(dim):
                        dot += q[base + d] * k_tile[p, d]
                    score = dot * scale
                weights[hh, p] = score
            cuda.syncthreads()
            for hh in range(tid, group, threads):  # the running softmax, a head a thread
                h = h0 + hh
                chunk_max = float32(-math.inf)
                for p in range(CHUNK):
                    chunk_max = max(chunk_max, weights[hh, p])
                new_max = max(running_max[h], chunk_max)
                corr = math.exp(running_max[h] - new_max)
                total = float32(0.0)
                for p in range(CHUNK):
                    e = math.exp(weights[hh, p] - new_max)
                    weights[hh, p] = e
                    total += e
                running_sum[h] = running_sum[h] * corr + total
                running_max[h] = new_max
                correction[hh] = corr
            cuda.syncthreads()
            k = 0
            for i in range(tid, width, threads):  # the weighted sum of V, for this group's heads
                h = i // dim
                if h >= h0 and h < h0 + group:
                    d = i - h * dim
                    a = acc[k] * correction[h - h0]
                    for p in range(CHUNK):
                        a += weights[h - h0, p] * v_tile[p, d]
                    acc[k] = a
                k += 1
            cuda.syncthreads()
    k = 0
    for i in range(tid, width, threads):
        h = i // dim
        if n_splits == 1:
            out[t, i] = acc[k] / running_sum[h]
        else:
            part_acc[t, split, i] = acc[k]
        k += 1
    if n_splits > 1:
        for h in range(tid, n_head, threads):
            part_max[t, split, h] = running_max[h]
            part_sum[t, split, h] = running_sum[h]
        # The last block of token t combines (the CUDA samples' threadFenceReduction): every
        # thread's writes made visible to the device, then one ticket a block.
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            ticket = cuda.atomic.add(done, t, 1)
            last[0] = 1 if ticket == n_splits - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:
            for i in range(tid, width, threads):
                out[t, i] = _combine(part_acc, part_max, part_sum, n_splits, dim, t, i)
            if tid == 0:
                done[t] = 0  # ready for the next launch (a graph replays this one)


@cuda.jit(device=True, inline=True)
def _combine(part_acc, part_max, part_sum, n_splits, dim, t, c):
    """out[t, c] from the splits' partial sums: sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M)."""
    h = c // dim
    top = float32(-math.inf)
    for s in range(n_splits):
        top = max(top, part_max[t, s, h])
    numerator = float32(0.0)
    denominator = float32(0.0)
    for s in range(n_splits):
        w = math.exp(part_max[t, s, h] - top)  # a split past the token's positions: e^-inf = 0
        numerator += part_acc[t, s, c] * w
        denominator += part_sum[t, s, h] * w
    return numerator / denominator


@cuda.jit(cache=True)
def copy(source, target):
    """target[:] = source[:], grid-stride: the memory-bandwidth yardstick."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, source.shape[0], stride):
        target[i] = source[i]


@cuda.jit(cache=True)
def copy_kv_prefix(source, target, n):
    """target[:, :n] = source[:, :n] for two caches viewed as [L, n_ctx, G*D] (their n_ctx may
    differ)."""
    i = cuda.grid(1)
    n_layer, row = source.shape[0], source.shape[2]
    per_layer = n * row
    if i < n_layer * per_layer:
        layer = i // per_layer
        rest = i - layer * per_layer
        p = rest // row
        target[layer, p, rest - p * row] = source[layer, p, rest - p * row]
