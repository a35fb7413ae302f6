"""The kernels of a forward pass other than the matrix products: embedding lookups, LayerNorm,
storing K/V rows into the cache, causal multi-query attention (`attention_step` for decode
steps, `attention` for prompts), and a copy kernel (the yardstick
for the device's memory bandwidth in `santacpu bench --device cuda`).

The KV cache is `[n_layer, n_ctx, G, D]` for K and for V, float32 or fp16 bits (uint16): one K/V
head serves every query head (multi-query), so attention reads each cached row once per query
token for all H heads.

Shapes: T = tokens in the call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.

`attention_step` is warp-per-head: a warp is `values.LANES` lanes (a GPU's 32, fewer under the
simulator), and the kernel is written for any power of two up to CHUNK. `attention` takes tiles
of TILE_ROWS query rows ((token, head) pairs), ROW_LANES threads a row; its inner loops read
flat shared arrays at unsigned offsets (Numba adds negative-index code to every signed index and
rebuilds a 64-bit address for each load otherwise; docs/gpu.md has what that cost).

May import: numba, numpy, `santacpu.backends.cuda.values`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32, int64, uint32, uint64

from ...kernel_cache import track_kernel_sources
from .values import LANES, SIMULATED, float_to_half, half_to_float, value

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

MAX_NORM_THREADS = 256
# Attention's compile-time limits (shared-memory sizes must be constants): at most 43 KB of shared memory a block.
CHUNK = 32  # positions staged at once
MAX_HEAD_DIM = 128
_K_STRIDE = 129  # MAX_HEAD_DIM + 1
MAX_HEADS = 16
# attention (prompts): query rows a block, threads a row (8 threads a block under the simulator)
TILE_ROWS = 4 if SIMULATED else 32
ROW_LANES = 2 if SIMULATED else 8
_ROW_POSITIONS = CHUNK // ROW_LANES  # a chunk's positions a lane scores
_ROW_DIMS = MAX_HEAD_DIM // ROW_LANES  # dims of a head a lane sums V for, at most
_ROW_WORDS = MAX_HEAD_DIM // 2 // ROW_LANES  # 32-bit words of a cached fp16 row a lane stages, at most
_SCORE_STRIDE = CHUNK + 1
# (shared-memory sizes must be constants of the module, not expressions in the kernel)
_Q_TILE = TILE_ROWS * _K_STRIDE
_KV_TILE = CHUNK * _K_STRIDE
_SCORE_TILE = TILE_ROWS * _SCORE_STRIDE


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
    inverse = float32(1.0) / math.sqrt(block_sum(sums, tid, n) / float32(width) + eps)  # (a multiply a value, not a division)
    for i in range(tid, width, n):
        out[t, i] = (x[t, i] - mean) * inverse * weight[i] + bias[i]


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
def _rounded(value, half):
    """value as the cache gives it back: through fp16 where the cache is fp16."""
    return half_to_float(float_to_half(value)) if half else value


@cuda.jit(device=True, inline=True)
def _halves(word):
    """The two fp16 values of a 32-bit word of a cache (the low half first) as float32."""
    return half_to_float(word & 65535), half_to_float((word >> 16) & 65535)


@cuda.jit(device=True, inline=True)
def _pair(words, cache, half, layer, position, head, pair):
    """Values 2*pair and 2*pair + 1 of a cached row: one 32-bit word of fp16 bits, or two floats."""
    if half:
        return _halves(int64(words[layer, position, head, pair]))
    return float32(cache[layer, position, head, 2 * pair]), float32(cache[layer, position, head, 2 * pair + 1])


@cuda.jit(device=True, inline=True)
def _stage_rows(words, cache, half, layer, g, p0, n_positions, tile, r, lane, dim):
    """tile[p * _K_STRIDE:][:dim] = cached row p0 + p of K/V head g, for the CHUNK positions from
    p0 (zeros from n_positions on: a weight of 0 must not meet a NaN of an unwritten row). Row r
    of the block's threads stages positions r, r + TILE_ROWS, .., its lanes a 32-bit word (two
    fp16 values, or one float) at a time: no division, the warp's reads in whole 32-byte sectors."""
    half_dim = dim // 2
    whole = lane + (_ROW_WORDS - 1) * ROW_LANES < half_dim  # all the lane's words in a row (head_dim 128 on a GPU)
    loaded = cuda.local.array(_ROW_WORDS, uint32)
    # constant trip counts on a GPU (unrolled); the simulator, which runs every iteration in
    # Python, loops over the words there are
    words_loop = (half_dim + ROW_LANES - 1) // ROW_LANES if SIMULATED else _ROW_WORDS
    for m in range(CHUNK // TILE_ROWS):
        p = r + m * TILE_ROWS
        inside = p0 + p < n_positions
        # a row inside the cache to read from either way: the loads then need no branch, and go
        # out together (constant trip counts and unsigned indices: constant offsets of one address)
        position, head = uint64(min(p0 + p, n_positions - 1)), uint64(g)
        row = uint64(p * _K_STRIDE + 2 * lane) if half else uint64(p * _K_STRIDE + lane)
        if half and whole:
            for n in range(_ROW_WORDS):
                loaded[n] = uint32(words[uint64(layer), position, head, uint64(lane + n * ROW_LANES)])
            for n in range(_ROW_WORDS):
                a, b = _halves(loaded[n] if inside else uint32(0))
                tile[row + uint64(2 * n * ROW_LANES)] = a
                tile[row + uint64(2 * n * ROW_LANES + 1)] = b
        elif half:
            for n in range(words_loop):
                if lane + n * ROW_LANES < half_dim:
                    a, b = _halves(uint32(words[uint64(layer), position, head, uint64(lane + n * ROW_LANES)]) if inside else uint32(0))
                    tile[row + uint64(2 * n * ROW_LANES)] = a
                    tile[row + uint64(2 * n * ROW_LANES + 1)] = b
        else:
            for n in range(2 * words_loop):
                d = lane + n * ROW_LANES
                if d < dim:
                    tile[row + uint64(n * ROW_LANES)] = cache[uint64(layer), position, head, uint64(d)] if inside else float32(0.0)


@cuda.jit(device=True, inline=True)
def _add_scores(row_scores, q_tile, kv_tile, q_row, k_column, d):
    """row_scores[k] += q[d] K[d] for the lane's positions k (rows lane + k ROW_LANES of kv_tile)."""
    q_d = q_tile[q_row + d]
    for k in range(_ROW_POSITIONS):
        row_scores[k] += q_d * kv_tile[k_column + d + uint64(k * ROW_LANES * _K_STRIDE)]


@cuda.jit(cache=True)
def attention(qkv, k_cache, v_cache, k_words, v_words, layer, positions, index, half, n_head, scale, chunks_per_split,
              out, part_acc, part_max, part_sum, done):
    """Causal multi-query attention for prompts (calls of more than STEP_TOKENS tokens, whose K/V
    rows `store_kv` has stored already). A K/V head's query rows are its (token, head) pairs in
    order, token-major: row i is token i // group, head g * group + i % group. One block per
    (TILE_ROWS of those rows, split of the positions, K/V head g); ROW_LANES threads a row. The
    call's first position, start, is positions[index] (device memory).

    Each chunk of CHUNK positions is staged once in shared memory for all the block's rows
    (multi-query: every head of every token reads the same K/V rows; SantaCoder's 16 heads make
    a tile of 32 rows two tokens): K, the rows' scores (lane j of a row scores positions j,
    j + ROW_LANES, ..), a running softmax that every lane of a row keeps alike in registers, then
    V in K's place and the weighted sums (lane j of a row owns dims j, j + ROW_LANES, ..). With
    one split the block writes its rows of out [T, E]; with several it writes partial sums and the
    last of a tile's blocks to finish (a ticket in done[tile, g], set back to 0) adds them up
    (`_combine`). k_words / v_words are uint32 views of fp16 caches (the caches themselves when
    float32). q is qkv[t, :E] as [H, D]."""
    tile_index = cuda.blockIdx.x
    split = cuda.blockIdx.y
    g = cuda.blockIdx.z
    n_splits = cuda.gridDim.y
    tid = cuda.threadIdx.x
    r = tid // ROW_LANES
    lane = tid - r * ROW_LANES
    n_tokens = out.shape[0]
    n_kv = k_cache.shape[2]
    dim = k_cache.shape[3]
    group = n_head // n_kv
    n_rows = n_tokens * group
    # Shared tiles as flat arrays read at unsigned offsets: no negative-index code, and a
    # thread's loads of a row at constant offsets from one address.
    q_tile = cuda.shared.array(_Q_TILE, float32)  # [TILE_ROWS, _K_STRIDE]
    # [CHUNK, _K_STRIDE]: K, then V; rows 129 apart: lanes reading one d, many p, hit distinct banks
    kv_tile = cuda.shared.array(_KV_TILE, float32)
    # [TILE_ROWS, _SCORE_STRIDE]: a row's 32 read by its lanes, rows in distinct banks
    scores = cuda.shared.array(_SCORE_TILE, float32)
    weights = cuda.shared.array(_SCORE_TILE, float32)
    last = cuda.shared.array(1, int32)  # whether this block is its tile's last to finish
    first_row = tile_index * TILE_ROWS
    start = positions[index]
    row = first_row + r
    active = row < n_rows
    t = row // group if active else 0
    h = g * group + row - t * group
    n_positions = start + t + 1 if active else 0  # this row's
    block_positions = start + (min(first_row + TILE_ROWS, n_rows) - 1) // group + 1  # the tile's last row's
    q_row = uint64(r * _K_STRIDE)
    k_column = uint64(lane * _K_STRIDE)  # row `lane` of kv_tile
    score_row = uint64(r * _SCORE_STRIDE)
    n_dim = uint64(dim)
    for d in range(lane, dim, ROW_LANES):
        q_tile[q_row + uint64(d)] = qkv[t, h * dim + d] if active else float32(0.0)
    running_max = float32(-math.inf)
    running_sum = float32(0.0)
    acc = cuda.local.array(_ROW_DIMS, float32)  # dims lane, lane + ROW_LANES, ..
    dims_loop = (dim + ROW_LANES - 1) // ROW_LANES if SIMULATED else _ROW_DIMS  # (see _stage_rows)
    for k in range(_ROW_DIMS):
        acc[k] = 0.0
    row_scores = cuda.local.array(_ROW_POSITIONS, float32)  # positions lane, lane + ROW_LANES, .. of a chunk
    first_chunk = split * chunks_per_split
    last_chunk = min(first_chunk + chunks_per_split, (block_positions + CHUNK - 1) // CHUNK)
    for chunk in range(first_chunk, last_chunk):
        p0 = chunk * CHUNK
        _stage_rows(k_words, k_cache, half, layer, g, p0, block_positions, kv_tile, r, lane, dim)
        cuda.syncthreads()  # (the first time, q_tile too)
        for k in range(_ROW_POSITIONS):
            row_scores[k] = 0.0
        d = uint64(0)
        while d + uint64(4) <= n_dim:  # 4 dims a pass: loads at constant offsets of two addresses
            for c in range(4):
                _add_scores(row_scores, q_tile, kv_tile, q_row, k_column, d + uint64(c))
            d += uint64(4)
        while d < n_dim:
            _add_scores(row_scores, q_tile, kv_tile, q_row, k_column, d)
            d += uint64(1)
        for k in range(_ROW_POSITIONS):
            j = lane + k * ROW_LANES
            scores[score_row + uint64(j)] = row_scores[k] * scale if p0 + j < n_positions else float32(-math.inf)
        cuda.syncthreads()
        chunk_max = float32(-math.inf)
        for j in range(CHUNK):
            chunk_max = max(chunk_max, scores[score_row + uint64(j)])
        new_max = max(running_max, chunk_max)
        correction = float32(1.0)
        if new_max != -math.inf:  # (all masked so far: nothing to weigh, and e^(-inf - -inf) is NaN)
            correction = math.exp(running_max - new_max)
        for k in range(_ROW_POSITIONS):
            j = lane + k * ROW_LANES
            weight = float32(0.0)
            if new_max != -math.inf:
                weight = math.exp(scores[score_row + uint64(j)] - new_max)
            weights[score_row + uint64(j)] = weight
        running_max = new_max
        _stage_rows(v_words, v_cache, half, layer, g, p0, block_positions, kv_tile, r, lane, dim)  # K read: barrier above
        cuda.syncthreads()
        running_sum *= correction
        for k in range(dims_loop):
            acc[k] *= correction
        for j in range(CHUNK):
            w = weights[score_row + uint64(j)]
            running_sum += w
            v_row = uint64(j * _K_STRIDE + lane)
            for k in range(dims_loop):
                acc[k] += w * kv_tile[v_row + uint64(k * ROW_LANES)]
        cuda.syncthreads()
    if n_splits == 1:
        if active:
            for k in range(dims_loop):
                d = lane + k * ROW_LANES
                if d < dim:
                    out[t, h * dim + d] = acc[k] / running_sum
        return
    if active:
        for k in range(dims_loop):
            d = lane + k * ROW_LANES
            if d < dim:
                part_acc[t, split, h * dim + d] = acc[k]
        if lane == 0:
            part_max[t, split, h] = running_max
            part_sum[t, split, h] = running_sum
    # The last block of the tile combines (the CUDA samples' threadFenceReduction): every
    # thread's writes made visible to the device, then one ticket a block.
    cuda.threadfence()
    cuda.syncthreads()
    ticket_index = tile_index * n_kv + g
    if tid == 0:
        ticket = cuda.atomic.add(done, ticket_index, 1)
        last[0] = 1 if ticket == n_splits - 1 else 0
    cuda.syncthreads()
    if last[0] == 1:
        if active:
            for d in range(lane, dim, ROW_LANES):
                out[t, h * dim + d] = _combine(part_acc, part_max, part_sum, n_splits, dim, t, h * dim + d)
        if tid == 0:
            done[ticket_index] = 0  # ready for the next launch


MAX_SPLITS = 64  # attention_step: a token's positions in at most this many splits (shared arrays below)
_STEP_UNROLL = 4  # attention_step: K/V pairs of values each thread loads before storing any (loads in flight)
_STEP_POSITIONS = CHUNK // LANES  # attention_step: positions of a chunk a lane scores (1 on a GPU)
_STEP_DIMS = MAX_HEAD_DIM // LANES  # attention_step: dims of a head a lane sums V for, at most (4 on a GPU)


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
    n_dim = uint64(dim)
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
                # two chains (half the dependent adds), 4 dims a pass, shared memory read at
                # unsigned indices (no negative-index code: see `attention`)
                qw, kp, d = uint64(warp), uint64(p), uint64(0)
                while d + uint64(4) <= n_dim:
                    s0 += q[qw, d] * k_tile[kp, d]
                    s1 += q[qw, d + uint64(1)] * k_tile[kp, d + uint64(1)]
                    s0 += q[qw, d + uint64(2)] * k_tile[kp, d + uint64(2)]
                    s1 += q[qw, d + uint64(3)] * k_tile[kp, d + uint64(3)]
                    d += uint64(4)
                while d < n_dim:
                    s0 += q[qw, d] * k_tile[kp, d]
                    d += uint64(1)
                score = (s0 + s1) * scale
            scores[j] = score
            weights[warp, p] = score
        cuda.syncthreads()
        chunk_max = float32(-math.inf)
        for p in range(CHUNK):
            chunk_max = max(chunk_max, weights[uint64(warp), uint64(p)])
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
            w = weights[uint64(warp), uint64(p)]
            total += w
            for k in range(dims_loop):
                if lane + LANES * k < dim:
                    acc[k] += w * v_tile[uint64(p), uint64(lane + LANES * k)]
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
