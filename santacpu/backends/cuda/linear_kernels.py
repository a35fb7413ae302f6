"""Matrix products on the stored formats: y = x @ W.T + b, with an epilogue, W read as stored.

Three kernels, one launch each, for every format (the format is a run-time argument that every
thread of a launch shares, so its branches cost nothing and one compiled kernel per part dtype
serves it):

- `matvec_one` (decode, one token): x staged in shared memory, whole blocks a lane, the common
  formats' codes read as 32-bit words.
- `matvec` (a few tokens, T <= MAX_FEW_TOKENS): a group of `blockDim.x` lanes per output row; lane l
  reads blocks l, l + lanes, ... of the row (consecutive lanes read consecutive blocks: coalesced
  reads of the codes), applies each block's scale once, and multiplies it with every token's x;
  the lanes' sums are added by a shared-memory tree (the simulator has no warp shuffles).
- `matmul` (prompts): 4s rows x 4s tokens per block of s x s threads (s = 16 on a GPU: 64 x 64),
  4 x 4 outputs a thread; each step widens one block of 32 values of the tile's rows into shared
  memory (the codes unpacked in registers, never a dequantized matrix in device memory) next to
  the same 32 columns of the tile's tokens' x.

Epilogues (`EPILOGUE_*`): none; GELU (the fc product); add into `out` (the two projections that
end in the residual stream: `out` is then the residual itself, each element read and
written by the one thread that owns it).

Shapes: x [T, in] float32, weight [out, in] as parts, bias [out] float32, out [T, out] float32.

May import: numba, numpy, `santacpu.backends.cuda.values`.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int64

from .values import Q4_0, Q4_0_OFFSET, Q6_0, Q6_0_OFFSET, Q8_0, block_sum, code, half_to_float, params

MAX_FEW_TOKENS = 8  # matvec's token limit (its accumulators are registers)
MAX_MATVEC_THREADS = 256  # lanes x rows a block
MAX_ONE_TOKEN_INPUTS = 8192  # matvec_one stages x [in] in shared memory: 32 KB
MAX_TILE_SIDE = 16  # matmul: at most 16 x 16 threads a block, each computing 4 rows x 4 tokens

# Shared-array sizes must be plain constants for Numba (not expressions).
_PARTIAL_VALUES = 2048  # MAX_MATVEC_THREADS * MAX_FEW_TOKENS
_TILE_STRIDE = 65  # TILE + 1: rows of a shared tile one word apart in banks

EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_ADD = 0, 1, 2
_GELU_C = math.sqrt(2.0 / math.pi)


@cuda.jit(device=True, inline=True)
def _finish(value, epilogue, out, t, row):
    if epilogue == 1:  # GPT-2's tanh GELU, as santacpu.network.reference.gelu_tanh
        return float32(0.5) * value * (float32(1.0) + math.tanh(float32(_GELU_C) * (value + float32(0.044715) * value * value * value)))
    if epilogue == 2:
        return out[t, row] + value
    return value


@cuda.jit(device=True, inline=True)
def _q4_word(word, xs, n_blocks, block, k):
    """sum over the 8 values of 32-bit word k (0..3) of a q4_0 block of (q - 8) * x: its bytes
    hold values 4k..4k+3 (low nibbles) and 4k+16..4k+19 (high)."""
    s = float32(0.0)
    for b in range(4):
        byte = (word >> (8 * b)) & 255
        j = 4 * k + b
        s += (float32((byte & 15) - Q4_0_OFFSET) * xs[j * n_blocks + block]
              + float32((byte >> 4) - Q4_0_OFFSET) * xs[(j + 16) * n_blocks + block])
    return s


@cuda.jit(cache=True)
def matvec_one(fmt, p0, p1, p2, p3, p4, words0, words1, x, bias, out, epilogue, normalize, ln_weight, ln_bias, eps):
    """One token (decode): out[0, row] = x[0] . W[row] + bias[row], with the epilogue; with
    `normalize`, x's LayerNorm (ln_weight, ln_bias, eps) first, computed by every block as it
    stages x (cheaper than a launch of its own).

    x is staged in shared memory transposed ([value in block][block]: lanes reading one value
    of consecutive blocks hit consecutive banks); `blockDim.x` lanes a row, `blockDim.y` rows a
    block, each lane summing whole blocks of 32 values with the block's scale applied once.
    q8_0, q4_0 and q6_0 read their codes as 32-bit words (`words0`, `words1`: uint32 views of
    p0, p1); the other formats go through `values.code`."""
    lanes = cuda.blockDim.x
    lane = cuda.threadIdx.x
    slot = cuda.threadIdx.y
    rows_here = cuda.blockDim.y
    tid = slot * lanes + lane
    threads = lanes * rows_here
    row = cuda.blockIdx.x * rows_here + slot
    n_rows = out.shape[1]
    n_blocks = x.shape[1] // 32
    xs = cuda.shared.array(MAX_ONE_TOKEN_INPUTS, float32)
    partial = cuda.shared.array(MAX_MATVEC_THREADS, float32)
    width = n_blocks * 32
    mean = float32(0.0)
    denominator = float32(1.0)
    if normalize:  # as layer_kernels.layer_norm: the mean, then the variance about it
        s = float32(0.0)
        for i in range(tid, width, threads):
            s += x[0, i]
        partial[tid] = s
        mean = block_sum(partial, tid, threads) / float32(width)
        s = float32(0.0)
        for i in range(tid, width, threads):
            d = x[0, i] - mean
            s += d * d
        partial[tid] = s
        denominator = math.sqrt(block_sum(partial, tid, threads) / float32(width) + eps)
    for i in range(tid, width, threads):
        block = i // 32
        v = x[0, i]
        if normalize:
            v = (v - mean) / denominator * ln_weight[i] + ln_bias[i]
        xs[(i - block * 32) * n_blocks + block] = v
    cuda.syncthreads()
    acc = float32(0.0)
    if row < n_rows:
        for block in range(lane, n_blocks, lanes):
            if fmt == Q4_0:  # 4 words of nibbles
                s = float32(0.0)
                for k in range(4):
                    s += _q4_word(int64(words0[row, block * 4 + k]), xs, n_blocks, block, k)
                acc += half_to_float(p1[row, block]) * s
            elif fmt == Q8_0:  # 8 words of signed bytes
                s = float32(0.0)
                for k in range(8):
                    word = int64(words0[row, block * 8 + k])  # int64: no unsigned wrap-around below
                    for b in range(4):
                        byte = (word >> (8 * b)) & 255
                        q = byte - 256 if byte >= 128 else byte
                        s += float32(q) * xs[(4 * k + b) * n_blocks + block]
                acc += half_to_float(p1[row, block]) * s
            elif fmt == Q6_0:  # 4 words of low nibbles, 2 words of high bit pairs
                high_a = int64(words1[row, block * 2])  # qh bytes 0..3: values 0..3 (+8, +16, +24)
                high_b = int64(words1[row, block * 2 + 1])  # qh bytes 4..7: values 4..7 (+8, ...)
                s = float32(0.0)
                for k in range(4):
                    word = int64(words0[row, block * 4 + k])
                    for b in range(4):
                        byte = (word >> (8 * b)) & 255
                        j = 4 * k + b  # values j and j + 16
                        jj = j & 7
                        high_byte = ((high_a if jj < 4 else high_b) >> (8 * (jj & 3))) & 255
                        shift = 2 * (j >> 3)
                        low_q = (byte & 15) | (((high_byte >> shift) & 3) << 4)
                        high_q = (byte >> 4) | (((high_byte >> (shift + 4)) & 3) << 4)
                        s += (float32(low_q - Q6_0_OFFSET) * xs[j * n_blocks + block]
                              + float32(high_q - Q6_0_OFFSET) * xs[(j + 16) * n_blocks + block])
                acc += half_to_float(p2[row, block]) * s
            else:
                scale, offset = params(fmt, p0, p1, p2, p3, p4, row, block)
                for j in range(32):
                    acc += (scale * code(fmt, p0, p1, p2, p3, p4, row, block, j) - offset) * xs[j * n_blocks + block]
    partial[tid] = acc
    cuda.syncthreads()
    if lane == 0 and row < n_rows:
        total = float32(0.0)
        for i in range(lanes):
            total += partial[slot * lanes + i]
        out[0, row] = _finish(total + bias[row], epilogue, out, 0, row)


@cuda.jit(cache=True)
def matvec(fmt, p0, p1, p2, p3, p4, x, n_tokens, bias, out, epilogue):
    lanes = cuda.blockDim.x
    lane = cuda.threadIdx.x
    slot = cuda.threadIdx.y  # the row of this block this lane group computes
    row = cuda.blockIdx.x * cuda.blockDim.y + slot
    n_rows = out.shape[1]
    n_blocks = x.shape[1] // 32
    partial = cuda.shared.array(_PARTIAL_VALUES, float32)
    acc = cuda.local.array(MAX_FEW_TOKENS, float32)
    for t in range(MAX_FEW_TOKENS):
        acc[t] = 0.0
    if row < n_rows:
        for block in range(lane, n_blocks, lanes):
            scale, offset = params(fmt, p0, p1, p2, p3, p4, row, block)
            base = block * 32
            for j in range(32):
                w = scale * code(fmt, p0, p1, p2, p3, p4, row, block, j) - offset
                for t in range(MAX_FEW_TOKENS):
                    if t < n_tokens:
                        acc[t] += w * x[t, base + j]
    mine = (slot * lanes + lane) * MAX_FEW_TOKENS
    for t in range(MAX_FEW_TOKENS):
        partial[mine + t] = acc[t]
    cuda.syncthreads()
    step = lanes // 2
    while step > 0:  # lanes is a power of two
        if lane < step:
            other = mine + step * MAX_FEW_TOKENS
            for t in range(MAX_FEW_TOKENS):
                partial[mine + t] += partial[other + t]
        cuda.syncthreads()
        step //= 2
    if row < n_rows:
        first = slot * lanes * MAX_FEW_TOKENS
        for t in range(lane, n_tokens, lanes):
            out[t, row] = _finish(partial[first + t] + bias[row], epilogue, out, t, row)


@cuda.jit(cache=True)
def matmul(fmt, p0, p1, p2, p3, p4, x, n_tokens, bias, out, epilogue):
    side = cuda.blockDim.x  # square blocks of side x side threads, a tile of 4 * side rows and tokens
    tile = 4 * side
    tx = cuda.threadIdx.x  # rows tx, tx + side, ...: consecutive threads write consecutive outputs
    ty = cuda.threadIdx.y  # tokens ty, ty + side, ...
    tid = ty * side + tx
    threads = side * side
    row0 = cuda.blockIdx.x * tile
    tok0 = cuda.blockIdx.y * tile
    n_rows = out.shape[1]
    n_blocks = x.shape[1] // 32
    w_tile = cuda.shared.array((32, _TILE_STRIDE), float32)  # [column in block, row]; +1: no bank conflicts
    x_tile = cuda.shared.array((32, _TILE_STRIDE), float32)  # [column in block, token]
    acc = cuda.local.array(16, float32)
    for i in range(16):
        acc[i] = 0.0
    for block in range(n_blocks):
        # each job widens 8 values of one row and loads 8 of one token (4 jobs a row)
        for job in range(tid, 4 * tile, threads):
            r = job >> 2
            j0 = (job & 3) * 8
            row = row0 + r
            if row < n_rows:
                scale, offset = params(fmt, p0, p1, p2, p3, p4, row, block)
                for jj in range(8):
                    w_tile[j0 + jj, r] = scale * code(fmt, p0, p1, p2, p3, p4, row, block, j0 + jj) - offset
            else:
                for jj in range(8):
                    w_tile[j0 + jj, r] = 0.0
            tok = tok0 + r
            for jj in range(8):
                x_tile[j0 + jj, r] = x[tok, block * 32 + j0 + jj] if tok < n_tokens else float32(0.0)
        cuda.syncthreads()
        for k in range(32):
            for i in range(4):
                a = w_tile[k, tx + side * i]
                for jt in range(4):
                    acc[i * 4 + jt] += a * x_tile[k, ty + side * jt]
        cuda.syncthreads()
    for i in range(4):
        row = row0 + tx + side * i
        if row < n_rows:
            for jt in range(4):
                tok = tok0 + ty + side * jt
                if tok < n_tokens:
                    out[tok, row] = _finish(acc[i * 4 + jt] + bias[row], epilogue, out, tok, row)
