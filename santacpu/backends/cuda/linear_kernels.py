"""Matrix products on the stored formats: y = x @ W.T + b, with an epilogue, W read as stored.

Four kernels, one launch each (the format is a run-time argument that every thread of a launch
shares, so its branches cost nothing and one compiled kernel per part dtype serves it):

- `matvec_one` (decode, one token): a warp a row, the codes of q8_0 / q4_0 / q6_0 read as 64-bit
  chunks (a GPU's warp reads 256 consecutive bytes at once), several in flight a lane, x staged in
  shared memory in the chunks' order (no bank conflicts), LayerNorm fused into its prologue,
  warp shuffles for the row's sum; the other formats value by value.
- `matvec_chunks` (a few tokens of q8_0 / q4_0 / q6_0, T <= MAX_CHUNK_TOKENS a launch: batched
  decode, drafts): the same reads, each chunk's codes widened once for every token, the tokens'
  x staged a tile of LANES chunks at a time.
- `matvec` (a few tokens of the other formats, T <= MAX_FEW_TOKENS): a group of `blockDim.x`
  lanes per output row, lane l reading blocks l, l + lanes, ...; a shared-memory tree adds them.
- `matmul` (prompts): 4s rows x 4s tokens per block of s x s threads (s = 16 on a GPU: 64 x 64),
  4 x 4 outputs a thread; each step widens one block of 32 values of the tile's rows into shared
  memory (the codes unpacked in registers, never a dequantized matrix in device memory) next to
  the same 32 columns of the tile's tokens' x.

A warp is `values.LANES` lanes: a GPU's 32, fewer under the simulator (every thread a Python
thread there); the kernels are written for any power of two. Warp sums go through `warp_total`
(shuffles on a GPU, shared memory under the simulator; here, not in values.py: see there why). (The 32s that remain
below are the formats' blocks of 32 values.)

Epilogues (`EPILOGUE_*`): none; GELU (the fc product); add into `out` (the two projections that
end in the residual stream: `out` is then the residual itself, each element read and
written by the one thread that owns it).

Shapes: x [T, in] float32, weight [out, in] as parts, bias [out] float32, out [T, out] float32.

May import: numba, numpy, `santacpu.backends.cuda.values`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32, int64, uint64

from ...kernel_cache import track_kernel_sources
from .values import (
    LANES, Q4_0, Q4_0_OFFSET, Q6_0, Q6_0_OFFSET, Q8_0, SIMULATED, WARP_SHUFFLES, code, half_to_float, params,
)

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

MAX_FEW_TOKENS = 8  # matvec's token limit (its accumulators are registers)
MAX_CHUNK_TOKENS = 16  # matvec_chunks' (a launch; the backend launches it twice for up to 32 tokens)
MAX_MATVEC_THREADS = 256  # lanes x rows a block
MAX_ONE_TOKEN_INPUTS = 8192  # matvec_one stages x [in] in shared memory: 32 KB
MAX_TILE_SIDE = 16  # matmul: at most 16 x 16 threads a block, each computing 4 rows x 4 tokens

# Shared-array sizes must be plain constants for Numba (not expressions).
_PARTIAL_VALUES = 2048  # MAX_MATVEC_THREADS * MAX_FEW_TOKENS
_TILE_STRIDE = 65  # TILE + 1: rows of a shared tile one word apart in banks

EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_ADD = 0, 1, 2
_GELU_C = math.sqrt(2.0 / math.pi)


@cuda.jit(device=True, inline=True)
def warp_total(value, scratch, base, lane):
    """The sum of value over a warp's LANES lanes, in every lane. By shuffles on a GPU (LANES =
    32); under the simulator through scratch[base : base + LANES] (this warp's own) and block
    barriers, so there every thread of the block must call it together."""
    if WARP_SHUFFLES:
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 16)
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 8)
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 4)
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 2)
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 1)
        return value
    scratch[base + lane] = value
    cuda.syncthreads()
    total = float32(0.0)
    for i in range(LANES):
        total += scratch[base + i]
    cuda.syncthreads()
    return total


@cuda.jit(device=True, inline=True)
def _finish(value, epilogue, out, t, row):
    if epilogue == 1:  # GPT-2's tanh GELU, as santacpu.network.reference.gelu_tanh
        return float32(0.5) * value * (float32(1.0) + math.tanh(float32(_GELU_C) * (value + float32(0.044715) * value * value * value)))
    if epilogue == 2:
        return out[t, row] + value
    return value


@cuda.jit(device=True, inline=True)
def _chunk_count(fmt, width):
    """matvec_one's 64-bit chunks of codes in a row: 16 values each (q4_0, q6_0: half a block's
    nibbles), 8 (q8_0); 0 for the formats read value by value."""
    if fmt == Q4_0 or fmt == Q6_0:
        return width // 16
    if fmt == Q8_0:
        return width // 8
    return 0


@cuda.jit(device=True, inline=True)
def _chunk_column(fmt, n_chunks, i):
    """The column of x that xs[i] holds: xs[v * n_chunks + c] is value v of chunk c (lanes reading
    value v of consecutive chunks hit consecutive banks); xs[i] = x[i] for the other formats."""
    if n_chunks == 0:
        return i
    v = i // n_chunks
    c = i - v * n_chunks
    if fmt == Q8_0:
        return 8 * c + v
    # q4_0 / q6_0: chunk c holds bytes 8(c & 1).. of block c >> 1: values 8(c & 1) + b (low
    # nibbles, v = b < 8) and 16 + 8(c & 1) + b (high, v = 8 + b)
    return 32 * (c >> 1) + 8 * (c & 1) + (v & 7) + 16 * (v >> 3)


@cuda.jit(device=True, inline=True)
def _chunk_load(fmt, chunks0, chunks1, p1, p2, row, c):
    """(codes, q6_0's high bits, scale bits) of chunk c of row."""
    if fmt == Q8_0:
        return chunks0[row, c], int64(0), int32(p1[row, c >> 2])
    if fmt == Q6_0:
        return chunks0[row, c], chunks1[row, c >> 1], int32(p2[row, c >> 1])
    return chunks0[row, c], int64(0), int32(p1[row, c >> 1])


@cuda.jit(device=True, inline=True)
def _chunk_dot(fmt, word, high, scale_bits, xs, n_chunks, c):
    """scale * sum over chunk c's values of code * x (x from xs, laid out by _chunk_column).
    (xs read at unsigned offsets: Numba puts negative-index code around every signed one, which
    was most of the loop's instructions.)"""
    s = float32(0.0)
    first, stride = uint64(c), uint64(n_chunks)
    if fmt == Q8_0:
        for b in range(8):
            q = int32((word >> (8 * b)) & 255)
            s += float32(int32((q ^ 128) - 128)) * xs[first + uint64(b) * stride]
    elif fmt == Q6_0:
        shift = 2 * (c & 1)  # values 8h + b take bits 2h of qh byte b; values 16 + 8h + b bits 2h + 4
        for b in range(8):
            q = int32((word >> (8 * b)) & 255)
            hb = int32((high >> (8 * b)) & 255)
            low = (q & 15) | (((hb >> shift) & 3) << 4)
            top = (q >> 4) | (((hb >> (shift + 4)) & 3) << 4)
            s += (float32(int32(low - Q6_0_OFFSET)) * xs[first + uint64(b) * stride]
                  + float32(int32(top - Q6_0_OFFSET)) * xs[first + uint64(b + 8) * stride])
    else:
        for b in range(8):
            q = int32((word >> (8 * b)) & 255)
            s += (float32(int32((q & 15) - Q4_0_OFFSET)) * xs[first + uint64(b) * stride]
                  + float32(int32((q >> 4) - Q4_0_OFFSET)) * xs[first + uint64(b + 8) * stride])
    return half_to_float(scale_bits) * s


def matvec_one_shared(width: int, warps: int) -> int:
    """Bytes of dynamic shared memory matvec_one takes: x, then `_block_total`'s scratch."""
    return 4 * (width + warps * (1 + LANES))


@cuda.jit(device=True, inline=True)
def _block_total(value, scratch, base, warp, lane, warps):
    """The sum of value over the block (every thread calls it), via scratch[base : base + warps (1 + LANES)]:
    the warps' sums, then each warp's LANES floats (warp_total's under the simulator)."""
    value = warp_total(value, scratch, base + warps + LANES * warp, lane)
    if lane == 0:
        scratch[base + warp] = value
    cuda.syncthreads()
    total = float32(0.0)
    for i in range(warps):
        total += scratch[base + i]
    cuda.syncthreads()
    return total


@cuda.jit(cache=True)
def matvec_one(fmt, p0, p1, p2, p3, p4, chunks0, chunks1, x, bias, out, epilogue, normalize, ln_weight, ln_bias, eps):
    """One token (decode): out[0, row] = x[0] . W[row] + bias[row], with the epilogue; with
    `normalize`, x's LayerNorm (ln_weight, ln_bias, eps) first, computed by every block as it
    stages x (cheaper than a launch of its own).

    A warp a row (blockDim = (LANES, warps)); the grid may be smaller than the rows / warps: a
    block then takes rows by a stride of gridDim.x * warps, x staged once in (dynamic) shared
    memory, laid out by `_chunk_column`. q8_0, q4_0 and q6_0 read their codes as 64-bit chunks
    (`chunks0`, `chunks1`: int64 views of p0, p1), lane l chunks l, l + LANES, ..: a GPU's warp
    reads 256 consecutive bytes at once. Four chunks a lane are loaded at a time, and the next four
    (or the next row's first) are loaded before these are multiplied, so the weights' memory
    latency overlaps the arithmetic and, for a block's first row, the staging of x; the lanes'
    sums are added by `warp_total`. The other formats go value by value through `values.code`.

    Dynamic shared memory: width + warps * (1 + LANES) floats (x, then scratch for the sums:
    `matvec_one_shared`)."""
    lane = cuda.threadIdx.x
    warp = cuda.threadIdx.y
    warps = cuda.blockDim.y
    tid = warp * LANES + lane
    threads = LANES * warps
    n_rows = out.shape[1]
    width = x.shape[1]
    xs = cuda.shared.array(0, float32)
    n_chunks = _chunk_count(fmt, width)
    row_step = cuda.gridDim.x * warps
    row = cuda.blockIdx.x * warps + warp
    n_groups = (n_rows - cuda.blockIdx.x * warps + row_step - 1) // row_step  # the block's row groups
    sets = (n_chunks + 4 * LANES - 1) // (4 * LANES)  # sets of 4 chunks a lane in a row
    last_row, last_chunk = n_rows - 1, max(n_chunks - 1, 0)
    w0 = w1 = w2 = w3 = h0 = h1 = h2 = h3 = int64(0)
    d0 = d1 = d2 = d3 = int32(0)
    if n_chunks > 0:  # the first set's loads, issued before the staging below
        r = min(row, last_row)
        w0, h0, d0 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(lane, last_chunk))
        w1, h1, d1 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(lane + LANES, last_chunk))
        w2, h2, d2 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(lane + 2 * LANES, last_chunk))
        w3, h3, d3 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(lane + 3 * LANES, last_chunk))
    mean = float32(0.0)
    inverse = float32(1.0)  # 1 / the standard deviation: one division, then a multiply a value
    if normalize:  # as layer_kernels.layer_norm: the mean, then the variance about it
        s = float32(0.0)
        for i in range(tid, width, threads):
            s += x[0, i]
        mean = _block_total(s, xs, width, warp, lane, warps) / float32(width)
        s = float32(0.0)
        for i in range(tid, width, threads):
            d = x[0, i] - mean
            s += d * d
        inverse = float32(1.0) / math.sqrt(_block_total(s, xs, width, warp, lane, warps) / float32(width) + eps)
    for i in range(tid, width, threads):
        column = _chunk_column(fmt, n_chunks, i)
        v = x[0, column]
        if normalize:
            v = (v - mean) * inverse * ln_weight[column] + ln_bias[column]
        xs[i] = v
    cuda.syncthreads()
    scratch = width + warps + LANES * warp  # this warp's LANES floats after x and the warps' sums (warp_total, simulator)
    if n_chunks == 0:  # value by value, a lane a column
        for _ in range(n_groups):
            acc = float32(0.0)
            if row < n_rows:
                for i in range(lane, width, LANES):
                    block = i // 32
                    scale, offset = params(fmt, p0, p1, p2, p3, p4, row, block)
                    acc += (scale * code(fmt, p0, p1, p2, p3, p4, row, block, i - block * 32) - offset) * xs[i]
            total = warp_total(acc, xs, scratch, lane)
            if lane == 0 and row < n_rows:
                out[0, row] = _finish(total + bias[row], epilogue, out, 0, row)
            row += row_step
        return
    acc = float32(0.0)
    k = 0
    for _ in range(n_groups * sets):
        next_k = k + 1
        next_row = row
        if next_k == sets:
            next_k = 0
            next_row = row + row_step
        r = min(next_row, last_row)
        c = lane + 4 * LANES * next_k
        n0, g0, e0 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(c, last_chunk))
        n1, g1, e1 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(c + LANES, last_chunk))
        n2, g2, e2 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(c + 2 * LANES, last_chunk))
        n3, g3, e3 = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(c + 3 * LANES, last_chunk))
        c = lane + 4 * LANES * k
        if row < n_rows:
            if c < n_chunks:
                acc += _chunk_dot(fmt, w0, h0, d0, xs, n_chunks, c)
            if c + LANES < n_chunks:
                acc += _chunk_dot(fmt, w1, h1, d1, xs, n_chunks, c + LANES)
            if c + 2 * LANES < n_chunks:
                acc += _chunk_dot(fmt, w2, h2, d2, xs, n_chunks, c + 2 * LANES)
            if c + 3 * LANES < n_chunks:
                acc += _chunk_dot(fmt, w3, h3, d3, xs, n_chunks, c + 3 * LANES)
        if k == sets - 1:  # the row's last set
            total = warp_total(acc, xs, scratch, lane)
            if lane == 0 and row < n_rows:
                out[0, row] = _finish(total + bias[row], epilogue, out, 0, row)
            acc = float32(0.0)
        w0, w1, w2, w3, h0, h1, h2, h3, d0, d1, d2, d3 = n0, n1, n2, n3, g0, g1, g2, g3, e0, e1, e2, e3
        row = next_row
        k = next_k


@cuda.jit(device=True, inline=True)
def _chunk_codes(fmt, word, high, c, codes):
    """codes[v] = value v of chunk c (laid out as `_chunk_column`), before the scale."""
    if fmt == Q8_0:
        for b in range(8):
            q = int32((word >> (8 * b)) & 255)
            codes[b] = float32(int32((q ^ 128) - 128))
    elif fmt == Q6_0:
        shift = 2 * (c & 1)
        for b in range(8):
            q = int32((word >> (8 * b)) & 255)
            hb = int32((high >> (8 * b)) & 255)
            codes[b] = float32(int32(((q & 15) | (((hb >> shift) & 3) << 4)) - Q6_0_OFFSET))
            codes[b + 8] = float32(int32(((q >> 4) | (((hb >> (shift + 4)) & 3) << 4)) - Q6_0_OFFSET))
    else:
        for b in range(8):
            q = int32((word >> (8 * b)) & 255)
            codes[b] = float32(int32((q & 15) - Q4_0_OFFSET))
            codes[b + 8] = float32(int32((q >> 4) - Q4_0_OFFSET))


def matvec_chunks_shared(n_tokens: int, per_chunk: int, warps: int) -> int:
    """Bytes of dynamic shared memory matvec_chunks takes for n_tokens tokens of chunks of
    per_chunk values: a tile's x, and the lanes' sums under the simulator."""
    return 4 * (n_tokens * LANES * per_chunk + (0 if WARP_SHUFFLES else LANES * MAX_CHUNK_TOKENS * warps))


@cuda.jit(cache=True)
def matvec_chunks(fmt, p1, p2, chunks0, chunks1, x, first, n_tokens, bias, out, epilogue):
    """A few tokens (batched decode, a token and its drafts): out[t, row] for tokens t = first ..
    first + n_tokens - 1 (n_tokens <= MAX_CHUNK_TOKENS), q8_0 / q4_0 / q6_0 only.

    A warp a row (rows by a stride of gridDim.x * warps where the grid is capped), lane l chunk
    l of each tile of LANES chunks (as matvec_one: coalesced 64-bit chunks); the tile's x for every token staged in (dynamic) shared memory, [token][value of
    chunk][lane], while the lane's chunk is in flight; a chunk's codes widened once into
    registers serve every token; the lanes' sums added by `warp_total`.

    Dynamic shared memory: n_tokens * LANES * (values a chunk) floats, and under the simulator
    LANES * MAX_CHUNK_TOKENS * warps more (the lanes' sums): `matvec_chunks_shared`."""
    lane = cuda.threadIdx.x
    warp = cuda.threadIdx.y
    warps = cuda.blockDim.y
    tid = warp * LANES + lane
    threads = LANES * warps
    row_step = cuda.gridDim.x * warps
    row = cuda.blockIdx.x * warps + warp
    n_rows = out.shape[1]
    n_groups = (n_rows - cuda.blockIdx.x * warps + row_step - 1) // row_step  # the block's row groups
    width = x.shape[1]
    n_chunks = _chunk_count(fmt, width)
    per_chunk = width // n_chunks
    tile_values = LANES * per_chunk
    staged = n_tokens * tile_values
    xs = cuda.shared.array(0, float32)
    codes = cuda.local.array(16, float32)
    acc = cuda.local.array(MAX_CHUNK_TOKENS, float32)
    # constant trip counts on a GPU (unrolled: codes and acc stay in registers); the simulator,
    # which runs every iteration in Python, loops over what there is
    token_loop = n_tokens if SIMULATED else MAX_CHUNK_TOKENS
    value_loop = per_chunk if SIMULATED else 16
    for _ in range(n_groups):
        for t in range(MAX_CHUNK_TOKENS):
            acc[t] = 0.0
        r = min(row, n_rows - 1)
        for c0 in range(0, n_chunks, LANES):
            c = c0 + lane
            word, high, scale_bits = _chunk_load(fmt, chunks0, chunks1, p1, p2, r, min(c, n_chunks - 1))
            cuda.syncthreads()  # the last tile's x is read
            for i in range(tid, staged, threads):
                t = i // tile_values
                j = i - t * tile_values
                v = j // LANES
                cc = c0 + j - v * LANES
                xs[i] = x[first + t, _chunk_column(fmt, n_chunks, v * n_chunks + cc)] if cc < n_chunks else float32(0.0)
            cuda.syncthreads()
            if row < n_rows and c < n_chunks:
                _chunk_codes(fmt, word, high, c, codes)
                scale = half_to_float(scale_bits)
                for t in range(token_loop):
                    if t < n_tokens:
                        base = uint64(t * tile_values + lane)  # (unsigned: see _chunk_dot)
                        s = float32(0.0)
                        for v in range(value_loop):
                            if v < per_chunk:
                                s += codes[v] * xs[base + uint64(LANES * v)]
                        acc[t] += scale * s
        if WARP_SHUFFLES:
            for t in range(MAX_CHUNK_TOKENS):
                if t < n_tokens:
                    total = warp_total(acc[t], xs, 0, lane)
                    if lane == 0 and row < n_rows:
                        out[first + t, row] = _finish(total + bias[row], epilogue, out, first + t, row)
        else:  # the simulator: every token's lanes through shared memory at once (two barriers, not 2T)
            base = staged + warp * LANES * MAX_CHUNK_TOKENS
            for t in range(MAX_CHUNK_TOKENS):
                if t < n_tokens:
                    xs[base + LANES * t + lane] = acc[t]
            cuda.syncthreads()
            if lane == 0 and row < n_rows:
                for t in range(n_tokens):
                    total = float32(0.0)
                    for i in range(LANES):
                        total += xs[base + LANES * t + i]
                    out[first + t, row] = _finish(total + bias[row], epilogue, out, first + t, row)
            cuda.syncthreads()
        row += row_step


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
