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

from numba import cuda, float32

from .values import float_to_half, half_to_float, value

MAX_NORM_THREADS = 256
MAX_ATTENTION_LANES = 32  # positions per chunk (blockDim.x)
MAX_HEADS = 32  # blockDim.y: one row of lanes per query head
MAX_HEAD_VALUES = 16  # D / lanes: the output values one lane accumulates


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
    cuda.syncthreads()
    step = n // 2
    while step > 0:
        if tid < step:
            sums[tid] += sums[tid + step]
        cuda.syncthreads()
        step //= 2
    mean = sums[0] / float32(width)
    cuda.syncthreads()  # everyone has read sums[0] before it is reused
    s = float32(0.0)
    for i in range(tid, width, n):
        d = x[t, i] - mean
        s += d * d
    sums[tid] = s
    cuda.syncthreads()
    step = n // 2
    while step > 0:
        if tid < step:
            sums[tid] += sums[tid + step]
        cuda.syncthreads()
        step //= 2
    denominator = math.sqrt(sums[0] / float32(width) + eps)
    for i in range(tid, width, n):
        out[t, i] = (x[t, i] - mean) / denominator * weight[i] + bias[i]


@cuda.jit(cache=True)
def store_kv(qkv, n_tokens, q_width, k_cache, v_cache, layer, start, half):
    """Rows of qkv [T, E + 2*G*D] (after Q: K, then V) into the caches at positions start.."""
    i = cuda.grid(1)
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


@cuda.jit(cache=True)
def attention(qkv, k_cache, v_cache, layer, start, half, n_head, scale, out):
    """One block per query token t (position start + t), blockDim (lanes, n_head): the lanes of
    head h score `lanes` cached positions at a time and keep a running softmax (max, sum and
    the weighted sum of V) over the chunks. q is qkv[t, :E] as [H, D]; out [T, E]."""
    t = cuda.blockIdx.x
    lane = cuda.threadIdx.x
    lanes = cuda.blockDim.x
    h = cuda.threadIdx.y
    n_kv = k_cache.shape[2]
    dim = k_cache.shape[3]
    g = h // (n_head // n_kv)
    q0 = h * dim
    weights = cuda.shared.array((MAX_HEADS, MAX_ATTENTION_LANES), float32)
    acc = cuda.local.array(MAX_HEAD_VALUES, float32)
    for k in range(MAX_HEAD_VALUES):
        acc[k] = 0.0
    n_positions = start + t + 1
    running_max = float32(-math.inf)
    total = float32(0.0)
    for first in range(0, n_positions, lanes):
        p = first + lane
        score = float32(-math.inf)
        if p < n_positions:
            dot = float32(0.0)
            for d in range(dim):
                dot += qkv[t, q0 + d] * _cached(k_cache, half, layer, p, g, d)
            score = dot * scale
        weights[h, lane] = score
        cuda.syncthreads()
        chunk_max = float32(-math.inf)
        for i in range(lanes):
            chunk_max = max(chunk_max, weights[h, i])
        new_max = max(running_max, chunk_max)
        correction = math.exp(running_max - new_max)
        cuda.syncthreads()  # all maxima read before the scores become weights
        weights[h, lane] = math.exp(score - new_max)
        cuda.syncthreads()
        chunk_sum = float32(0.0)
        n_here = min(lanes, n_positions - first)
        for i in range(n_here):
            chunk_sum += weights[h, i]
        total = total * correction + chunk_sum
        k = 0
        for d in range(lane, dim, lanes):
            a = acc[k] * correction
            for i in range(n_here):
                a += weights[h, i] * _cached(v_cache, half, layer, first + i, g, d)
            acc[k] = a
            k += 1
        running_max = new_max
        cuda.syncthreads()  # the weights are read before the next chunk's scores replace them
    k = 0
    for d in range(lane, dim, lanes):
        out[t, q0 + d] = acc[k] / total
        k += 1


@cuda.jit(cache=True)
def copy(source, target):
    """target[:] = source[:], grid-stride: the memory-bandwidth yardstick."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, source.shape[0], stride):
        target[i] = source[i]


@cuda.jit(cache=True)
def copy_kv_prefix(source, target, n):
    """target[:, :n] = source[:, :n] for two caches [L, n_ctx, G, D] (their n_ctx may differ)."""
    i = cuda.grid(1)
    n_layer, heads, dim = source.shape[0], source.shape[2], source.shape[3]
    row = heads * dim
    per_layer = n * row
    if i < n_layer * per_layer:
        layer = i // per_layer
        rest = i - layer * per_layer
        p = rest // row
        j = rest - p * row
        g = j // dim
        target[layer, p, g, j - g * dim] = source[layer, p, g, j - g * dim]
