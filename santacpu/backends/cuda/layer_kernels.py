"""The kernels of a forward pass other than the matrix products: embedding lookups, LayerNorm,
storing K/V rows into the cache, causal multi-query attention (`attention_step` for decode
steps, `attention` for prompts), and a copy kernel (the yardstick
for the device's memory bandwidth in `santacpu bench --device cuda`).

The KV cache is `[n_layer, n_ctx, G, D]` for K and for V, float32 or fp16 bits (uint16): one K/V
head serves every query head (multi-query), so attention reads each cached row once per query
token for all H heads.

Shapes: T = tokens in the call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.

`attention_step` is warp-per-head: a warp is `values.LANES` lanes (a GPU's 32, fewer under the
simulator), and the kernel is written for any power of two up to CHUNK.

May import: numba, numpy, `santacpu.backends.cuda.values`.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32, int64

from .values import LANES, SIMULATED, float_to_half, half_to_float, value

MAX_NORM_THREADS = 256
# Attention's compile-time limits (shared-memory sizes must be constants): 43 KB of shared memory.
CHUNK = 32  # positions staged at once
MAX_HEAD_DIM = 128
_K_STRIDE = 129  # MAX_HEAD_DIM + 1
MAX_HEADS = 16
MAX_WIDTH = 2048  # n_head * head_dim
MAX_OWNED = 8  # outputs a thread: MAX_WIDTH / (threads a block) at most


@cuda.jit(device=True, inline=True)
def block_sum(values, tid, threads):
    """Sum of values[0:threads] (a shared array each thread of the block has written its own
    element of, `threads` a power of two), by a tree; every thread returns it, and the array is
    free for reuse when it returns. (No warp shuffles: the simulator has none. Here, not in
    values.py: see there why.)"""
    cuda.syncthreads()
    step = threads // 2
    while step > 0:
        if tid < step:
            values[tid] += values[tid + step]
        cuda.syncthreads()
        step //= 2
    total = values[0]
    cuda.syncthreads()
    return total


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


@cuda.jit(device=True, inline=True)
def _store_kv_value(qkv, t, q_width, i, k_cache, v_cache, layer, position, half):
    """Element i of token t's K and V (qkv [T, E + 2*G*D], after Q: K, then V) into the caches at
    `position` (rounded to fp16 bits where `half`)."""
    dim = k_cache.shape[3]
    kv_width = k_cache.shape[2] * dim
    g = i // dim
    d = i - g * dim
    k = qkv[t, q_width + i]
    v = qkv[t, q_width + kv_width + i]
    if half:
        k_cache[layer, position, g, d] = float_to_half(k)
        v_cache[layer, position, g, d] = float_to_half(v)
    else:
        k_cache[layer, position, g, d] = k
        v_cache[layer, position, g, d] = v


@cuda.jit(cache=True)
def store_kv(qkv, n_tokens, q_width, k_cache, v_cache, layer, positions, index, half):
    """Rows of qkv [T, E + 2*G*D] (after Q: K, then V) into the caches at positions start..,
    start = positions[index] (device memory: see `attention`)."""
    i = cuda.grid(1)
    start = positions[index]
    kv_width = k_cache.shape[2] * k_cache.shape[3]
    if i < n_tokens * kv_width:
        t = i // kv_width
        _store_kv_value(qkv, t, q_width, i - t * kv_width, k_cache, v_cache, layer, start + t, half)


@cuda.jit(device=True, inline=True)
def _cached(cache, half, layer, position, head, d):
    return half_to_float(cache[layer, position, head, d]) if half else float32(cache[layer, position, head, d])


@cuda.jit(device=True, inline=True)
def _rounded(value, half):
    """value as the cache gives it back: through fp16 where the cache is fp16."""
    return half_to_float(float_to_half(value)) if half else value


@cuda.jit(cache=True)
def attention(qkv, k_cache, v_cache, layer, positions, index, half, n_head, scale, chunks_per_split, out,
              part_acc, part_max, part_sum, done):
    """Causal multi-query attention for prompts (calls of more than STEP_TOKENS tokens, whose
    K/V rows `store_kv` has stored already), one block per (query token t, split s of its
    positions); the call's first position, start, is positions[index] (device memory).

    Positions come in chunks of CHUNK: each chunk's K and V rows (every head's) are staged in
    shared memory once and serve all of a K/V head's query heads, which keep a running softmax
    (max, sum, weighted sum of V) across the split's chunks. With one split a token (long
    prompts: enough blocks already) the block writes out [T, E] itself; with several it writes
    its partial sums, and the last of token t's blocks to finish (counted in done[t], which it
    sets back to 0) adds them up into out[t] (`_combine`): no launch of its own. q is
    qkv[t, :E] as [H, D]."""
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
                if p0 + p < n_positions:
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


MAX_SPLITS = 64  # attention_step: a token's positions in at most this many splits (shared arrays below)
_STEP_UNROLL = 4  # attention_step: K/V pairs of values each thread loads before storing any (loads in flight)
_STEP_POSITIONS = CHUNK // LANES  # attention_step: positions of a chunk a lane scores (1 on a GPU)
_STEP_DIMS = MAX_HEAD_DIM // LANES  # attention_step: dims of a head a lane sums V for, at most (4 on a GPU)


@cuda.jit(device=True, inline=True)
def _pair(words, cache, half, layer, position, head, pair):
    """Values 2*pair and 2*pair + 1 of a cached row: one 32-bit word of fp16 bits, or two floats."""
    if half:
        w = int64(words[layer, position, head, pair])
        return half_to_float(w & 65535), half_to_float((w >> 16) & 65535)
    return float32(cache[layer, position, head, 2 * pair]), float32(cache[layer, position, head, 2 * pair + 1])


@cuda.jit(cache=True)
def attention_step(qkv, k_cache, v_cache, k_words, v_words, layer, positions, index, half, n_head, scale, chunks_per_split,
                   out, part_acc, part_max, part_sum, done):
    """Causal multi-query attention for a decode step (T <= STEP_TOKENS tokens), storing the call's
    own K/V rows: one block per (token t, split of its positions, group of heads); warp w of a
    block is head h0 + w (lane = positions lane, lane + LANES, .. of a chunk while scoring: one
    on a GPU; = dims lane, lane + LANES, .. while summing V), so each chunk of K/V rows is staged
    once, with coalesced 32-bit reads (fp16 pairs: `k_words`, `v_words` are uint32 views of fp16
    caches), for all the block's heads.

    start = positions[index] (device memory: a captured step replays at any position); token t
    sees positions 0..start+t, in ceil((start+t+1) / split) used splits: blocks past them return
    at once, so the grid may cover a whole position bucket. Rows from start on are read from qkv
    (rounded as the cache rounds them); the block of row start+t's split and head group 0 writes
    it into the cache. With one used split the block writes out[t] itself; with more, each
    writes its partial sums and the last to finish of (t, head group) (a ticket in done[t, z],
    set back to 0) adds them up: the splits' weights once in shared memory, 4 splits' loads in
    flight at a time."""
    t = cuda.blockIdx.x
    split = cuda.blockIdx.y
    z = cuda.blockIdx.z
    lane = cuda.threadIdx.x  # blockDim.x == LANES
    warp = cuda.threadIdx.y
    heads_here = cuda.blockDim.y
    tid = warp * LANES + lane
    threads = LANES * heads_here
    n_kv, dim = k_cache.shape[2], k_cache.shape[3]
    h = z * heads_here + warp
    g = (z * heads_here) // (n_head // n_kv)  # heads_here divides a K/V head's group
    width = n_head * dim
    kv_width = n_kv * dim
    half_dim = dim // 2
    k_tile = cuda.shared.array((CHUNK, _K_STRIDE), float32)
    v_tile = cuda.shared.array((CHUNK, MAX_HEAD_DIM), float32)
    q = cuda.shared.array((MAX_HEADS, MAX_HEAD_DIM), float32)
    weights = cuda.shared.array((MAX_HEADS, MAX_SPLITS), float32)  # a chunk's, then the splits'
    lanes_part = cuda.shared.array((MAX_HEADS, LANES), float32)
    last = cuda.shared.array(1, int32)
    ka = cuda.local.array(_STEP_UNROLL, float32)
    kb = cuda.local.array(_STEP_UNROLL, float32)
    va = cuda.local.array(_STEP_UNROLL, float32)
    vb = cuda.local.array(_STEP_UNROLL, float32)
    scores = cuda.local.array(_STEP_POSITIONS, float32)  # positions p0 + lane + LANES j of a chunk
    start = positions[index]
    n_positions = start + t + 1
    split_positions = chunks_per_split * CHUNK
    used = (n_positions + split_positions - 1) // split_positions
    if z == 0 and split == (start + t) // split_positions:
        for i in range(tid, kv_width, threads):
            _store_kv_value(qkv, t, width, i, k_cache, v_cache, layer, start + t, half)
    if split >= used:
        return
    for d in range(lane, dim, LANES):
        q[warp, d] = qkv[t, h * dim + d]
    running_max = float32(-math.inf)
    running_sum = float32(0.0)
    acc = cuda.local.array(_STEP_DIMS, float32)  # dims lane + LANES k
    for k in range(_STEP_DIMS):
        acc[k] = 0.0
    # a constant trip count on a GPU (unrolled: acc stays in registers); the simulator, which
    # runs every iteration in Python, loops over the dims there are
    dims_loop = (dim + LANES - 1) // LANES if SIMULATED else _STEP_DIMS
    first = split * split_positions
    end = min(first + split_positions, n_positions)
    n_pairs = CHUNK * half_dim
    for p0 in range(first, end, CHUNK):
        for i0 in range(tid, n_pairs, threads * _STEP_UNROLL):  # stage K, V rows p0..p0+CHUNK-1: loads first
            for u in range(_STEP_UNROLL):
                i = i0 + u * threads
                p = i // half_dim
                pair = i - p * half_dim
                position = p0 + p
                ka[u] = kb[u] = va[u] = vb[u] = float32(0.0)
                if i < n_pairs and position < end:
                    if position >= start:  # this call's row: from qkv, rounded as the cache rounds it
                        column = width + g * dim + 2 * pair
                        ka[u] = _rounded(qkv[position - start, column], half)
                        kb[u] = _rounded(qkv[position - start, column + 1], half)
                        va[u] = _rounded(qkv[position - start, column + kv_width], half)
                        vb[u] = _rounded(qkv[position - start, column + kv_width + 1], half)
                    else:
                        ka[u], kb[u] = _pair(k_words, k_cache, half, layer, position, g, pair)
                        va[u], vb[u] = _pair(v_words, v_cache, half, layer, position, g, pair)
            for u in range(_STEP_UNROLL):
                i = i0 + u * threads
                if i < n_pairs:
                    p = i // half_dim
                    d = 2 * (i - p * half_dim)
                    k_tile[p, d] = ka[u]
                    k_tile[p, d + 1] = kb[u]
                    v_tile[p, d] = va[u]
                    v_tile[p, d + 1] = vb[u]
        cuda.syncthreads()
        for j in range(_STEP_POSITIONS):  # position p0 + p
            p = lane + LANES * j
            score = float32(-math.inf)
            if p0 + p < end:
                s0 = float32(0.0)
                s1 = float32(0.0)
                for d in range(0, dim, 2):  # two chains: half the dependent adds
                    s0 += q[warp, d] * k_tile[p, d]
                    s1 += q[warp, d + 1] * k_tile[p, d + 1]
                score = (s0 + s1) * scale
            scores[j] = score
            weights[warp, p] = score
        cuda.syncthreads()
        chunk_max = float32(-math.inf)
        for p in range(CHUNK):
            chunk_max = max(chunk_max, weights[warp, p])
        new_max = max(running_max, chunk_max)
        correction = math.exp(running_max - new_max)
        cuda.syncthreads()  # every lane has read the scores
        for j in range(_STEP_POSITIONS):
            weights[warp, lane + LANES * j] = math.exp(scores[j] - new_max)
        cuda.syncthreads()
        total = float32(0.0)
        for k in range(dims_loop):
            acc[k] *= correction
        for p in range(CHUNK):
            w = weights[warp, p]
            total += w
            for k in range(dims_loop):
                if lane + LANES * k < dim:
                    acc[k] += w * v_tile[p, lane + LANES * k]
        running_sum = running_sum * correction + total
        running_max = new_max
        cuda.syncthreads()  # the tiles are free for the next chunk
    if used == 1:
        for k in range(dims_loop):
            if lane + LANES * k < dim:
                out[t, h * dim + lane + LANES * k] = acc[k] / running_sum
        return
    for k in range(dims_loop):
        if lane + LANES * k < dim:
            part_acc[t, split, h * dim + lane + LANES * k] = acc[k]
    if lane == 0:
        part_max[t, split, h] = running_max
        part_sum[t, split, h] = running_sum
    cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        ticket = cuda.atomic.add(done, t * cuda.gridDim.z + z, 1)
        last[0] = 1 if ticket == used - 1 else 0
    cuda.syncthreads()
    if last[0] == 0:
        return
    # the last block: the splits' weights e^(m_s - M) into shared memory (lanes over splits), then the sums
    top = float32(-math.inf)
    for s in range(lane, used, LANES):
        top = max(top, part_max[t, s, h])
    lanes_part[warp, lane] = top
    cuda.syncthreads()
    for i in range(LANES):
        top = max(top, lanes_part[warp, i])
    cuda.syncthreads()
    mine = float32(0.0)
    for s in range(lane, used, LANES):
        w = math.exp(part_max[t, s, h] - top)
        weights[warp, s] = w
        mine += part_sum[t, s, h] * w
    lanes_part[warp, lane] = mine
    cuda.syncthreads()
    denominator = float32(0.0)
    for i in range(LANES):
        denominator += lanes_part[warp, i]
    for k in range(dims_loop):
        c = lane + LANES * k
        if c < dim:
            column = h * dim + c
            a = float32(0.0)
            for s0 in range(0, used, 4):  # four loads in flight (indices clamped, weights zeroed past the end)
                s1 = min(s0 + 1, used - 1)
                s2 = min(s0 + 2, used - 1)
                s3 = min(s0 + 3, used - 1)
                x0 = part_acc[t, s0, column]
                x1 = part_acc[t, s1, column]
                x2 = part_acc[t, s2, column]
                x3 = part_acc[t, s3, column]
                a += x0 * weights[warp, s0]
                a += x1 * weights[warp, s1] if s0 + 1 < used else float32(0.0)
                a += x2 * weights[warp, s2] if s0 + 2 < used else float32(0.0)
                a += x3 * weights[warp, s3] if s0 + 3 < used else float32(0.0)
            out[t, column] = a / denominator
    if tid == 0:
        done[t * cuda.gridDim.z + z] = 0  # ready for the next launch (a graph replays this one)


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
