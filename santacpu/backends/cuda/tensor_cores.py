"""Prompt products on tensor cores: y = x @ W.T + b for the block formats (q8_0, q4_0, q6_0, q4_m),
through `mma.sync` in inline PTX (numba.cuda has no tensor-core API; the PTX is what CUDA C's
`mma` intrinsics emit). Needs compute capability 8.0 or more (the m16n8k16 shape with fp16 inputs
and fp32 accumulators).

Exactness: a block's codes are small integers (q8_0's -127..127, q4_0's and q6_0's less their
offset, q4_m's 0..15), exact in fp16; each x value is split into two fp16 halves, x = hi + lo (lo
the rest of hi, rounded), and both meet the same codes, so x loses about 2**-22 of itself (near
fp32's 2**-24) instead of plain fp16's 2**-12. The tensor cores add the integer-times-x products
of a block in fp32; the block's scale (and q4_m's minimum times x's block sum, from fp32 x) then
apply per row in fp32, as `linear_kernels.matmul` does. (|x| must stay below fp16's 65504.)

A product is three launches: `half_codes` writes the weight's codes as fp16 pairs and `split_x`
x's two halves (and its block sums), both padded with zeros to whole tiles, into scratch the
backend reuses; `matmul_tc` then only copies words into its tiles (a thread's 24 loads of a step
in flight together) and multiplies. The codes' scratch costs one more write and read of the weight
as fp16 (~2 bytes a weight), against decoding every code again in each of a row tile's T / 64
blocks; the token tiles of a row tile are neighbours in the grid, so they find its codes in L2.

Tiles: a block of 4 warps computes 64 tokens x 64 rows; warp w takes tokens 32 (w // 2).. and rows
32 (w % 2)..: 2 x 4 tiles of 16 tokens x 8 rows. Each step stages one block of 32 values of the
tile's rows (codes in pairs, `w_tile [row, word]`) and of its tokens (`hi_tile`, `lo_tile`
[token, word]) in shared memory, rows 20 words apart so that a warp's fragment loads hit 32
different banks. A lane's fragments (PTX ISA, m16n8k16: g = lane // 4, t = lane % 4):
A (x) words [g, t], [g + 8, t], [g, t + 4], [g + 8, t + 4] of its 16 tokens x 8 words; B (codes)
words [g, t], [g, t + 4] of its 8 rows; C/D values (token g, rows 2t, 2t + 1) and (token g + 8,
the same rows).

Under the simulator (no PTX there) `warp_mma`, `split_half2` and `pack_half2` are Python twins:
`warp_mma` builds the warp's A and B from all 32 lanes' fragments, loaded by the `fragment_a` and
`fragment_b` the GPU path loads them with and placed as the PTX ISA places them, so a wrong
fragment index fails the tests there too. The kernel is the same code on both.

Shapes: x [T, in] float32, weight [out, in] as parts (values.py), bias [out] float32, out [T, out]
float32; codes [padded(out), in / 2] and x_hi, x_lo [padded(T), in / 2] uint32 (fp16 pairs),
x_sums [padded(T), in / 32] float32.

May import: numba, numpy, llvmlite, `santacpu.backends.cuda.values`, `linear_kernels`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import inspect
import itertools
import threading

import numpy as np
from numba import cuda, float32, uint32, uint64

from ...kernel_cache import track_kernel_sources
from .linear_kernels import _finish
from .values import Q4_M, SIMULATED, code, params

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

TILE = 64  # tokens and rows of a block's tile
WARP = 32  # a warp's lanes (always 32 here: mma's fragments are defined over 32)
THREADS = 4 * WARP
WORDS = 16  # 32-bit words of a block of 32 fp16 values
_STRIDE = 20  # WORDS + 4: a tile's rows 20 words apart (fragment loads free of bank conflicts)
MIN_COMPUTE_CAPABILITY = (8, 0)


@cuda.jit(device=True, inline=True)
def fragment_a(tile, m, word, lane):
    """A lane's A fragment (4 words): x of tokens m.. of a tile, words word..word + 7 (k 0..15)."""
    g, t = lane // 4, lane % 4
    return tile[m + g, word + t], tile[m + g + 8, word + t], tile[m + g, word + t + 4], tile[m + g + 8, word + t + 4]


@cuda.jit(device=True, inline=True)
def fragment_b(tile, n, word, lane):
    """A lane's B fragment (2 words): codes of rows n.. of a tile, words word..word + 7."""
    g, t = lane // 4, lane % 4
    return tile[n + g, word + t], tile[n + g, word + t + 4]


UNAVAILABLE: str | None = None  # why this numba.cuda cannot carry the PTX (None: it can)

if not SIMULATED:
    from llvmlite import ir
    from numba import types

    try:
        from numba.cuda.extending import intrinsic
    except ImportError as error:  # the backend keeps the fp32 tiles, saying why
        UNAVAILABLE = f"this numba.cuda has no intrinsics for inline PTX ({error})"

        def intrinsic(function):
            return None

    _MMA = (
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
    )
    # hi = fp16 pair of (x0, x1) (x0 in the low half); lo = fp16 pair of what hi leaves of them
    _SPLIT = (
        "{ .reg .b16 h0, h1; .reg .f32 r0, r1; "
        "cvt.rn.f16x2.f32 $0, $3, $2; "
        "mov.b32 {h0, h1}, $0; "
        "cvt.f32.f16 r0, h0; cvt.f32.f16 r1, h1; "
        "sub.f32 r0, $2, r0; sub.f32 r1, $3, r1; "
        "cvt.rn.f16x2.f32 $1, r1, r0; }"
    )

    @intrinsic
    def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A B + C for a warp's 16 x 16 fp16 A, 16 x 8 fp16 B, 16 x 8 fp32 C: this lane's
        fragments in (uint32 pairs of fp16; fp32), its 4 values of D out."""
        sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            asm = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4),
                _MMA, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            )
            result = builder.call(asm, args)
            values = [builder.extract_value(result, i) for i in range(4)]
            return context.make_tuple(builder, signature.return_type, values)

        return sig, codegen

    @intrinsic
    def split_half2(typingctx, x0, x1):
        """(hi, lo): x0 and x1 as fp16 pairs (x0 in the low half) such that x = hi + lo."""
        sig = types.UniTuple(types.uint32, 2)(types.float32, types.float32)

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([i32, i32]), [f32, f32]), _SPLIT, "=r,=r,f,f")
            result = builder.call(asm, args)
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(result, i) for i in range(2)])

        return sig, codegen

    @intrinsic
    def pack_half2(typingctx, low, high):
        """Two float32 values rounded to fp16, as one uint32 (low in the low half)."""
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [f32, f32]), "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f")
            return builder.call(asm, args)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def warp_mma(x_tile, m, w_tile, n, word, lane, c0, c1, c2, c3):
        a0, a1, a2, a3 = fragment_a(x_tile, m, word, lane)
        b0, b1 = fragment_b(w_tile, n, word, lane)
        return mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

else:
    # Where each lane's fp16 values sit in A [16, 16] and B [16, 8] (PTX ISA, m16n8k16), value h
    # of a lane being half h % 2 of its register h // 2.
    _LANE, _HALF = np.meshgrid(np.arange(WARP), np.arange(8), indexing="ij")
    _G, _T, _REG, _WITHIN = _LANE // 4, _LANE % 4, _HALF // 2, _HALF % 2
    _A_ROWS, _A_COLS = _G + 8 * (_REG % 2), 2 * _T + _WITHIN + 8 * (_REG // 2)
    _B_ROWS, _B_COLS = (2 * _T + _WITHIN + 8 * _REG)[:, :4], _G[:, :4]

    _calls = threading.local()  # each simulated thread's count of its warp_mma calls
    _products: dict = {}  # (the block's tile, block, warp, call) -> (the warp's A B, a count of lanes that took it)

    def _warp_product(x_tile, m, w_tile, n, word) -> np.ndarray:
        """A B [16, 8] from every lane's fragments, loaded by the code that loads them on a GPU (on
        all lanes at once) and placed in A and B as the PTX ISA places them."""
        lanes = np.arange(WARP)
        a = np.zeros((16, 16))
        b = np.zeros((16, 8))
        a[_A_ROWS, _A_COLS] = np.stack(fragment_a.py_func(x_tile, m, word, lanes), axis=1).astype(np.uint32).view(np.float16)
        b[_B_ROWS, _B_COLS] = np.stack(fragment_b.py_func(w_tile, n, word, lanes), axis=1).astype(np.uint32).view(np.float16)
        return a @ b

    @cuda.jit(device=True)
    def warp_mma(x_tile, m, w_tile, n, word, lane, c0, c1, c2, c3):
        # A warp's lanes make the same calls in the same order (mma.sync's contract): the first of
        # them to make its k-th call computes the product, the warp's 32 take their values from it
        # (no barrier needed: the tiles stay put between the kernel's own; no lock: a contended
        # one costs the simulator's threads a switch interval each).
        call = getattr(_calls, "count", 0)
        _calls.count = call + 1
        key = (id(w_tile), cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x // WARP, call)  # id(w_tile): this block of this launch
        entry = _products.get(key)
        if entry is None:  # (two lanes may both compute it: setdefault keeps one, atomically)
            entry = _products.setdefault(key, (_warp_product(x_tile, m, w_tile, n, word), itertools.count(1)))
        if next(entry[1]) == WARP:  # the warp's last lane
            del _products[key]
        d = entry[0]
        g, t = lane // 4, lane % 4
        return (
            np.float32(d[g, 2 * t] + c0), np.float32(d[g, 2 * t + 1] + c1),
            np.float32(d[g + 8, 2 * t] + c2), np.float32(d[g + 8, 2 * t + 1] + c3),
        )

    @cuda.jit(device=True)
    def split_half2(x0, x1):
        hi = np.array([x0, x1], np.float32).astype(np.float16)
        lo = (np.array([x0, x1], np.float32) - hi.astype(np.float32)).astype(np.float16)
        return hi.view(np.uint32)[0], lo.view(np.uint32)[0]

    @cuda.jit(device=True)
    def pack_half2(low, high):
        return np.array([low, high], np.float32).astype(np.float16).view(np.uint32)[0]


@cuda.jit(cache=True)
def half_codes(fmt, p0, p1, p2, p3, p4, n_rows, codes):
    """codes[row, w] = values 2w and 2w + 1 of a weight's row before their block's scale (the
    stored integers less the format's offset) as an fp16 pair, value 2w in the low half: exact,
    ready for `matmul_tc` to copy into its tiles (codes [padded(n_rows), in / 2] uint32, zeros
    past n_rows; a scratch the backend reuses). A thread a word."""
    i = cuda.grid(1)
    n_words = codes.shape[1]
    if i < codes.shape[0] * n_words:
        row = i // n_words
        w = i - row * n_words
        block = w // WORDS
        j = 2 * (w - block * WORDS)
        word = uint32(0)
        if row < n_rows:
            word = pack_half2(code(fmt, p0, p1, p2, p3, p4, row, block, j), code(fmt, p0, p1, p2, p3, p4, row, block, j + 1))
        codes[row, w] = word


@cuda.jit(cache=True)
def split_x(x, n_tokens, x_hi, x_lo, x_sums):
    """x [T, in] float32 as two fp16 halves in pairs, x = hi + lo (x_hi, x_lo [padded(T), in / 2]
    uint32, value 2w in the low half of word w), and x's sum over each block of 32 values (x_sums
    [padded(T), in / 32] float32: q4_m's minimums meet it); zeros past T. A thread a (token,
    block)."""
    i = cuda.grid(1)
    n_blocks = x_sums.shape[1]
    if i < x_sums.shape[0] * n_blocks:
        tok = i // n_blocks
        block = i - tok * n_blocks
        total = float32(0.0)
        for w in range(block * WORDS, block * WORDS + WORDS):
            a, b = float32(0.0), float32(0.0)
            if tok < n_tokens:
                a, b = x[tok, 2 * w], x[tok, 2 * w + 1]
            hi, lo = split_half2(a, b)
            x_hi[tok, w] = hi
            x_lo[tok, w] = lo
            total += a + b
        x_sums[tok, block] = total


_JOBS = TILE * WORDS // THREADS  # words of each staged tile a thread copies a block
_JOB_ROWS = THREADS // WORDS  # tile rows the block's threads copy at once


def padded(n: int) -> int:
    """n rounded up to whole tiles: the rows of `half_codes`' and `split_x`'s outputs."""
    return -(-n // TILE) * TILE


# At least 3 blocks a multiprocessor: ptxas then keeps the kernel within 168 registers with no
# spill (171 otherwise, which leaves room for 2: tools/ptx_check). numba-cuda's jit takes launch
# bounds; the simulator's and older ones do not.
_BOUNDS = {"launch_bounds": (THREADS, 3)} if not SIMULATED and "launch_bounds" in inspect.signature(cuda.jit).parameters else {}


@cuda.jit(cache=True, **_BOUNDS)
def matmul_tc(fmt, p0, p1, p2, p3, p4, codes, x_hi, x_lo, x_sums, n_tokens, bias, out, epilogue):
    """out[:n_tokens] = x @ W.T + bias with the epilogue, from the weight's codes as fp16 pairs
    (`half_codes`) and x split (`split_x`): each block of 32 values of the tile's rows and tokens
    is copied word by word into shared memory (the loads independent, a thread's all in flight
    at once), then multiplied on the tensor cores; the block's scales (`params`, from the parts)
    and q4_m's minimums times x's block sums apply per row in fp32."""
    tid = cuda.threadIdx.x
    warp = tid // WARP
    lane = tid % WARP
    g = lane // 4
    t = lane % 4
    tok0 = cuda.blockIdx.x * TILE  # a row tile's token tiles run side by side: its codes read from memory once
    row0 = cuda.blockIdx.y * TILE
    warp_tokens = (warp // 2) * 32  # within the tile
    warp_rows = (warp % 2) * 32
    n_rows = out.shape[1]
    n_blocks = x_sums.shape[1]
    w_tile = cuda.shared.array((TILE, _STRIDE), uint32)  # [row, word]: codes 2w, 2w + 1 as fp16
    hi_tile = cuda.shared.array((TILE, _STRIDE), uint32)  # [token, word]: x 2w, 2w + 1, high halves
    lo_tile = cuda.shared.array((TILE, _STRIDE), uint32)
    scales = cuda.shared.array(TILE, float32)  # the block's scale and offset of each tile row
    offsets = cuda.shared.array(TILE, float32)
    sums = cuda.shared.array(TILE, float32)  # q4_m: each tile token's sum of x over the block
    acc = cuda.local.array(32, float32)  # [tile of 16 tokens (2), tile of 8 rows (4), value (4)]
    r_first = tid // WORDS  # the thread copies word w_first of tile rows r_first, r_first + _JOB_ROWS, ..
    w_first = uint64(tid - r_first * WORDS)
    for i in range(32):
        acc[i] = float32(0.0)
    for block in range(n_blocks):
        # A plain copy (the operands are padded with zeros to whole tiles): no branch around a
        # load, so a thread's 3 x _JOBS loads go out together.
        # (Unsigned indices: no negative-index code, and the k-th load a constant stride from the first.)
        column = uint64(block * WORDS + w_first)
        for k in range(_JOBS):
            r = uint64(r_first + k * _JOB_ROWS)
            w_tile[r, w_first] = codes[uint64(row0) + r, column]
            hi_tile[r, w_first] = x_hi[uint64(tok0) + r, column]
            lo_tile[r, w_first] = x_lo[uint64(tok0) + r, column]
        if tid < TILE:
            row = row0 + tid
            scale, offset = params(fmt, p0, p1, p2, p3, p4, row, block) if row < n_rows else (float32(0.0), float32(0.0))
            scales[tid] = scale
            offsets[tid] = offset
            tok = tok0 + tid
            sums[tid] = x_sums[tok, block] if fmt == Q4_M else float32(0.0)
        cuda.syncthreads()
        for mi in range(2):
            m = warp_tokens + 16 * mi
            for ni in range(4):
                n = warp_rows + 8 * ni
                # values 0..15 of the block (words 0..7), then 16..31, each against x's hi and lo
                zero = float32(0.0)
                d0, d1, d2, d3 = warp_mma(hi_tile, m, w_tile, n, 0, lane, zero, zero, zero, zero)
                d0, d1, d2, d3 = warp_mma(lo_tile, m, w_tile, n, 0, lane, d0, d1, d2, d3)
                d0, d1, d2, d3 = warp_mma(hi_tile, m, w_tile, n, 8, lane, d0, d1, d2, d3)
                d0, d1, d2, d3 = warp_mma(lo_tile, m, w_tile, n, 8, lane, d0, d1, d2, d3)
                r_a = n + 2 * t
                at = (mi * 4 + ni) * 4
                acc[at] += scales[r_a] * d0 - offsets[r_a] * sums[m + g]
                acc[at + 1] += scales[r_a + 1] * d1 - offsets[r_a + 1] * sums[m + g]
                acc[at + 2] += scales[r_a] * d2 - offsets[r_a] * sums[m + g + 8]
                acc[at + 3] += scales[r_a + 1] * d3 - offsets[r_a + 1] * sums[m + g + 8]
        cuda.syncthreads()
    for mi in range(2):
        for ni in range(4):
            at = (mi * 4 + ni) * 4
            tok = tok0 + warp_tokens + 16 * mi + g
            row = row0 + warp_rows + 8 * ni + 2 * t
            _store(acc[at], epilogue, out, bias, tok, row, n_tokens, n_rows)
            _store(acc[at + 1], epilogue, out, bias, tok, row + 1, n_tokens, n_rows)
            _store(acc[at + 2], epilogue, out, bias, tok + 8, row, n_tokens, n_rows)
            _store(acc[at + 3], epilogue, out, bias, tok + 8, row + 1, n_tokens, n_rows)


@cuda.jit(device=True, inline=True)
def _store(value, epilogue, out, bias, tok, row, n_tokens, n_rows):
    if tok < n_tokens and row < n_rows:
        out[tok, row] = _finish(value + bias[row], epilogue, out, tok, row)


def grid(n_tokens: int, n_rows: int) -> tuple[int, int]:
    """matmul_tc's grid for a product of n_tokens x n_rows (its blocks: THREADS threads): token
    tiles first, so that the blocks of one row tile run together."""
    return -(-n_tokens // TILE), -(-n_rows // TILE)


def supported(compute_capability: tuple[int, int]) -> bool:
    return tuple(compute_capability) >= MIN_COMPUTE_CAPABILITY

