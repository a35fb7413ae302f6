"""Integer dot products for the block formats (q8_0, q4_0, q4_m, q6_0), on CPUs that have them:
the products of one token, a few tokens and a long prompt, every (row, token) sum computed by
the same operations in all three, so a token's result never depends on its call.

Why: the float kernels of `quant_kernels.py` widen every code to float32, which makes 4-bit
decode compute-bound. Here each token's x is rounded once per call to integers, per block of 32
values with one float32 scale (as llama.cpp does for its quantized dot products), and the weight
codes meet those integers in the CPU's dot-product instructions, exact int32 sums of 2 or 4
products each:
- 4- and 6-bit codes (unsigned: 0..15, 0..63) against x rounded to int8 (max |x| -> 127):
  `vpdpbusd` (AVX-512 VNNI on 512-bit vectors, 4 blocks a step; AVX-VNNI or AVX-512 VNNI on
  256-bit vectors, 2 blocks), or on AVX2 `vpmaddubsw` for each half of a step, the two int16
  results added, then one `vpmaddwd` (no overflow: 2 x 2 x 63 x 127 = 32004);
- q8_0's signed codes, widened to int16, against x rounded to int16 (max |x| -> 32767):
  `vpdpwssd` (VNNI) or `vpmaddwd` (AVX2); int8 everywhere would double q8_0's KL divergence (the
  row groups' VNNI tiles take int8 x for the layer matrices only: repack.py, docs/kernels.md).
The int32 lanes are converted to float once per step and multiplied by the lanes' scales (weight
scale x activation scale) into float accumulators, reduced once per row. On 256-bit vectors the
4/6-bit kernels first sum each block's lanes for 4 (row, token) pairs into one vector (`QUADS`:
two vphaddd, or on AVX2 two vphaddw on the int16 sums of 4-bit codes, then one vpmaddwd), so the
block offsets, the conversion and the scaling are paid once for 4 pairs. q4_m's minimums add one
product per (row, token, block): a contiguous dot of the row's minimum codes with the token's
block sums of x (`_block_sums`). Where none of these instruction sets exists (or the backend is
built with integer_kernels=False: SANTACPU_INT_DOT=0 at load), the float kernels run instead.
The measurements behind each choice: docs/kernels.md.

The backend prepares its weights as row groups instead (`repack.py`: rows interleaved at
load, no sums across lanes), and these kernels serve weights used as loaded (calibration, the
float/integer comparisons of the tests).

The kernel works on tiles of rows x tokens (`_tile`): each step decodes a row's codes once for
all the tile's tokens, so many tokens cost far less than one pass each. The prompt tile fits the
register file (PROMPT_TILE), and a thread takes 64 rows through all the tokens before
the next rows (the rows stay in L2, a tile's x in L1).

Layouts of the rounded x (per token):
- 4/6-bit, `quantize_activations`: xq int8 [C], the blocks of each step reordered so that one
  vector load matches one of the codes' nibble vectors: for a step of S blocks, first the values
  0..15 of each of its blocks, then the values 16..31 (a block's packed byte j holds its values j
  and j+16). xfix int32 [C/8]: per int32 lane (4b + g for block b, lane g), -8 x the sum of the 8
  values that meet in that lane (with QUADS: of the block's 32 values, in each of its lanes); a
  q4_0 step adds it to its lanes (with QUADS: to each block's sum), which subtracts the codes'
  offset 8 exactly (q6_0: x4 for its offset 32). xdx float32 [C/8]: x's block scale per lane.
- q8_0, `quantize_activations_words`: xq int16 [C], a step's blocks as their values 0..15, then
  their values 16..31; xdx float32 [C/4]: the block scale for each of a block's 8 lanes.
Blocks after the last whole step keep their natural order (the drivers finish them in scalar code).

A weight's format reaches the kernels as its id (`blocks.BlockFormat.format_id`), a literal
constant, never guessed from its parts' dtypes. The instruction choice is made when a kernel
compiles, from the target features Numba compiles for; Numba's on-disk cache is keyed by those features, so cached code never meets another CPU.
(Like quant_kernels.py, the kernels here inline cpu_kernels.py's `f16_to_f32`: the cache key of
`santacpu.kernel_cache` covers this folder's files, so a change there compiles them again.)
(The old `<N x i32>` operand form of the VNNI intrinsics is used: LLVM 22 still upgrades it, and
older LLVMs know only that one.)

May import: numba, llvmlite, numpy, `santacpu.backends.cpu.cpu_kernels`, `santacpu.backends.cpu.isa`,
`santacpu.backends.cpu.target`, `santacpu.formats.blocks`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ...formats.blocks import FORMATS as BLOCK_FORMATS
from ...formats.blocks import QK
from ...kernel_cache import track_kernel_sources
from .cpu_kernels import FASTMATH, f16_to_f32
from .isa import x86
from .isa.llvm_ir import F32, I8, I16, I32, declare, load_vector, splat
from .target import compile_features, host_target

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

LANES_PER_BLOCK = 4  # int32 lanes per block of 32 values (4 products each)


# int_dot's names for the x86 targets it has kernels for (its instruction set follows the backend's
# choice of target for the same features: target.TARGETS states what each one needs).
_ISA_OF_TARGET = {"avx512-vnni": "vnni512", "avx-vnni": "vnni256", "avx2": "avx2"}


def choose_isa(features: set[str]) -> str | None:
    """'vnni512', 'vnni256', 'avx2', or None (no integer dot products) for a feature set."""
    best = host_target(features)
    return _ISA_OF_TARGET.get(best.name) if best is not None else None


ISA = choose_isa(compile_features())
VNNI = ISA in ("vnni512", "vnni256")  # vpdpbusd / vpdpwssd, else AVX2's multiply-add chains
# A decode tile's rows are contiguous: each step prefetches its share of the bytes PREFETCH_BYTES
# ahead as whole cache lines, in address order (one stream a tile, each line once). 4/6-bit codes
# on 256-bit vectors go into L1 (prefetcht0), the rest into L2 (prefetcht1): docs/kernels.md.
PREFETCH_BYTES = 8192
VECTOR_BYTES = 64 if ISA == "vnni512" else 32  # bytes per vector register
BLOCKS_PER_STEP = VECTOR_BYTES // 16  # S: 4-bit blocks per vector step (16 code bytes each)
WORD_BLOCKS = VECTOR_BYTES // QK  # q8_0 blocks per vector step (32 code bytes each)
QUADS = VECTOR_BYTES == 32  # 256-bit vectors: float work shared by 4 (row, token) pairs (_tile_codegen)
WORD_SUMS = ISA == "avx2"  # 4-bit codes' quads summed as int16 (x86.quad_sum_words)
# The formats with integer kernels, and the integer range x is rounded to for each.
ACTIVATION_LEVELS = {"q8_0": 32767, "q4_0": 127, "q4_m": 127, "q6_0": 127}
FORMATS = tuple(ACTIVATION_LEVELS)
# The kernels get a weight's format as its id (blocks.BlockFormat.format_id), a literal constant:
# each format compiles its own code.
FORMAT_NAMES = {BLOCK_FORMATS[name].format_id: name for name in FORMATS}


def _format_name(fmt) -> str | None:
    """The name of the format whose id a literal int type holds (None for anything else)."""
    return FORMAT_NAMES.get(fmt.literal_value) if isinstance(fmt, types.IntegerLiteral) else None


# --- LLVM IR helpers (S = BLOCKS_PER_STEP; a step's codes are one vector of 16 S bytes) -----------


def _repeat_per_lane(builder, per_block, lanes_per_block=LANES_PER_BLOCK):
    """<n x T> per-block values -> <n * lanes_per_block x T>, each repeated for its block's lanes."""
    lanes = per_block.type.count * lanes_per_block
    mask = ir.Constant(ir.VectorType(I32, lanes), [i // lanes_per_block for i in range(lanes)])
    return builder.shuffle_vector(per_block, ir.Constant(per_block.type, None), mask)


def _widen_scales(builder, raw, fmt, lanes):
    """Weight scales <n x i16> (fp16 bits) or <n x i8> (q4_m's unsigned codes) -> <n x float>."""
    if fmt == "q4_m":
        return builder.uitofp(raw, ir.VectorType(F32, lanes))
    return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(F32, lanes))


def _concatenate(builder, vectors):
    """Equal-typed vectors <n x T> -> one <k n x T> holding them in order (k: len(vectors) rounded
    up to a power of two; the padding repeats the last vector)."""
    while len(vectors) > 1:
        if len(vectors) % 2:
            vectors = vectors + [vectors[-1]]
        n = vectors[0].type.count
        mask = ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n)))
        vectors = [builder.shuffle_vector(a, b, mask) for a, b in zip(vectors[::2], vectors[1::2])]
    return vectors[0]


def _pick_lanes(builder, vectors, picks):
    """<len(picks) x T> whose lane L is element picks[L][1] of vectors[picks[L][0]]."""
    n = vectors[0].type.count
    joined = _concatenate(builder, list(vectors))
    mask = ir.Constant(ir.VectorType(I32, len(picks)), [v * n + e for v, e in picks])
    return builder.shuffle_vector(joined, ir.Constant(joined.type, None), mask)


def _quads(n_rows, n_tokens):
    """The tile's (row, token) pairs grouped by 4 for the 256-bit kernels: 4 rows of one token
    where the rows allow, else 4 tokens of one row, else one pair a group."""
    if n_rows % 4 == 0:
        return [[(i + p, j) for p in range(4)] for j in range(n_tokens) for i in range(0, n_rows, 4)]
    if n_tokens % 4 == 0:
        return [[(i, j + p) for p in range(4)] for i in range(n_rows) for j in range(0, n_tokens, 4)]
    return [[(i, j)] for i in range(n_rows) for j in range(n_tokens)]


def _q6_high_bits(builder, qh, n_blocks):
    """The 2-bit high parts, in bits 4-5, of the values in the two nibble vectors of a q6_0 step
    (values 0..15 of each block, then 16..31): qh <8S x i8> (byte j of a block: bits 2k..2k+1
    hold value j + 8k). Each block's 8 bytes are repeated to fill its 16 (one shuffle); then a
    shift per int32 lane (vpsllvd / vpsrlvd: lanes of bytes 0..7 and 8..15 of a block hold pairs
    k and k + 1) brings pair k to bits 4-5, and a mask drops the rest (bits shifted in from the
    neighbouring byte land outside bits 4-5)."""
    n = 16 * n_blocks
    mask = [8 * b + j % 8 for b in range(n_blocks) for j in range(16)]
    repeated = builder.bitcast(
        builder.shuffle_vector(qh, ir.Constant(qh.type, None), ir.Constant(ir.VectorType(I32, n), mask)),
        ir.VectorType(I32, n // 4),
    )
    low_shift = ir.Constant(ir.VectorType(I32, n // 4), [4, 4, 2, 2] * n_blocks)  # pairs 0, 1 -> bits 4-5
    high_shift = ir.Constant(ir.VectorType(I32, n // 4), [0, 0, 2, 2] * n_blocks)  # pairs 2, 3 -> bits 4-5
    bits = splat(I8, n, 0x30)
    vec8 = ir.VectorType(I8, n)
    low = builder.and_(builder.bitcast(builder.shl(repeated, low_shift), vec8), bits)
    high = builder.and_(builder.bitcast(builder.lshr(repeated, high_shift), vec8), bits)
    return low, high


def _horizontal_sum(builder, vector):
    n = vector.type.count
    while n > 1:
        n //= 2
        low = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, n), list(range(n))))
        high = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))))
        vector = builder.fadd(low, high)
    return builder.extract_element(vector, ir.Constant(I32, 0))


def _tile_codegen(fmt, n_rows, n_tokens):
    """Codegen of _tile for `fmt` and an n_rows x n_tokens tile. Each step decodes each row's
    codes once for all the tile's tokens. A one-token tile also prefetches the codes PREFETCH_BYTES
    ahead (decode streams the weights from memory; many tokens reuse rows from cache). Float work
    per step (every tile shape does the same per (row, token), so all shapes give the same sums):
    - 4/6-bit codes on 256-bit vectors (QUADS): the int32 lanes of 4 (row, token) pairs are summed
      per block (x86.quad_sum, x86.quad_sum_words) into one vector, lane 4h + p for pair p and block h of
      the step, then converted, scaled and accumulated once for the 4 pairs; a pair's result is its
      two lanes added at the end;
    - q8_0, and 512-bit vectors: one float accumulator per pair, updated lane by lane, reduced at
      the end."""
    words = fmt == "q8_0"  # int16 words against int16 x; the others: unsigned bytes against int8 x
    S = WORD_BLOCKS if words else BLOCKS_PER_STEP  # blocks per step
    lanes_per_block = QK // 4 if words else LANES_PER_BLOCK
    quads = QUADS and not words  # q8_0's steps hold one block: its lanes cost less than a quad's shuffles
    locality = 3 if QUADS and not words else 2  # where decode's prefetches go (PREFETCH_BYTES)
    groups = _quads(n_rows, n_tokens) if quads else [[(i, j)] for i in range(n_rows) for j in range(n_tokens)]

    def codegen(context, builder, signature, args):
        parts_type = signature.args[0]
        parts = [
            context.make_array(t)(context, builder, v)
            for t, v in zip(parts_type.types, cgutils.unpack_tuple(builder, args[0], len(parts_type.types)))
        ]
        xq, xfix, xdx, out = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (1, 2, 3, 7))
        row, token, n_steps = args[4], args[5], args[6]
        qh = None
        if fmt in ("q4_0", "q8_0"):
            codes, scale_parts = parts
            xfix = xfix if fmt == "q4_0" else None
        elif fmt == "q4_m":
            codes, scale_parts = parts[0], parts[1]  # qs, sc (d, dmin and mn: _finish_row)
            xfix = None
        else:
            codes, qh, scale_parts = parts
        scale_element = I8 if fmt == "q4_m" else I16
        n_bytes = VECTOR_BYTES  # code bytes per step and row
        lanes = n_bytes // 4
        x_per_step = n_bytes if words else 2 * n_bytes  # x values per step
        intp = row.type
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        codes_per_row = cgutils.unpack_tuple(builder, codes.shape, 2)[1]
        n_blocks = cgutils.unpack_tuple(builder, scale_parts.shape, 2)[1]
        x_cols = cgutils.unpack_tuple(builder, xq.shape, 2)[1]
        lane_cols = cgutils.unpack_tuple(builder, xdx.shape, 2)[1]
        n_out = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        acc_type = ir.VectorType(F32, lanes)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_type, None)) for _ in groups]
        fmuladd = declare(builder, f"llvm.fmuladd.v{lanes}f32", acc_type, acc_type, acc_type, acc_type)
        prefetch = declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), ir.IntType(8).as_pointer(), I32, I32, I32)
        rows = [builder.add(row, const(i)) for i in range(n_rows)]
        code_rows = [builder.mul(r, codes_per_row) for r in rows]
        x_rows = [builder.mul(builder.add(token, const(j)), x_cols) for j in range(n_tokens)]
        lane_rows = [builder.mul(builder.add(token, const(j)), lane_cols) for j in range(n_tokens)]
        x_element = I16 if words else I8
        halves = [  # q8_0: the code bytes of each half of a step, values 16k..16k+15 of every block
            ir.Constant(ir.VectorType(I32, n_bytes // 2), [QK * b + 16 * k + j for b in range(S) for j in range(16)])
            for k in range(2)
        ] if words else None
        with cgutils.for_range(builder, n_steps) as loop:
            step = loop.index
            code_at = builder.mul(step, const(n_bytes))
            lane_at = builder.mul(step, const(lanes))
            x_at = builder.mul(step, const(x_per_step))
            block_at = builder.mul(step, const(S))
            row_codes, row_scales = [], []  # per row: (low, high) code vectors; scales <S x i16|i8>
            for i in range(n_rows):
                packed = load_vector(builder, codes.data, builder.add(code_rows[i], code_at), I8, n_bytes)
                if n_tokens == 1 and i < n_rows * n_bytes // 64:  # line i of the step's share ahead
                    share = builder.add(builder.mul(step, const(n_rows * n_bytes)), const(64 * i))
                    ahead = builder.add(builder.add(code_rows[0], const(PREFETCH_BYTES)), share)
                    address = builder.bitcast(builder.gep(codes.data, [ahead]), ir.IntType(8).as_pointer())
                    builder.call(prefetch, [address, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])
                if words:  # the step's values 0..15 of each block, then 16..31, as int16
                    low, high = (
                        builder.sext(builder.shuffle_vector(packed, packed, pick), ir.VectorType(I16, n_bytes // 2))
                        for pick in halves
                    )
                else:
                    low = builder.and_(packed, splat(I8, n_bytes, 0x0F))
                    high = builder.lshr(packed, splat(I8, n_bytes, 4))
                if qh is not None:
                    qh_at = builder.add(builder.mul(rows[i], builder.mul(n_blocks, const(8))), builder.mul(step, const(8 * S)))
                    high_bits = _q6_high_bits(builder, load_vector(builder, qh.data, qh_at, I8, 8 * S), S)
                    low, high = builder.or_(low, high_bits[0]), builder.or_(high, high_bits[1])
                row_codes.append((low, high))
                scale_at = builder.add(builder.mul(rows[i], n_blocks), block_at)
                row_scales.append(load_vector(builder, scale_parts.data, scale_at, scale_element, S))
            x_scales = [load_vector(builder, xdx.data, builder.add(lane_rows[j], lane_at), F32, lanes) for j in range(n_tokens)]

            x_fixes = [
                load_vector(builder, xfix.data, builder.add(lane_rows[j], lane_at), I32, lanes) for j in range(n_tokens)
            ] if xfix is not None else None

            def x_values(i, j):
                n_x = row_codes[i][0].type.count
                x_low = load_vector(builder, xq.data, builder.add(x_rows[j], x_at), x_element, n_x)
                return x_low, load_vector(builder, xq.data, builder.add(builder.add(x_rows[j], x_at), const(n_x)), x_element, n_x)

            def lane_sums(i, j, fix=True):
                """Row i . token j over this step: <lanes x i32>, lane g of block b at b * lanes_per_block + g."""
                low, high = row_codes[i]
                start = ir.Constant(ir.VectorType(I32, lanes), None)
                if xfix is not None and fix:
                    start = x_fixes[j]
                    if fmt == "q6_0":  # offset 32 = 4 x 8
                        start = builder.shl(start, splat(I32, lanes, 2))
                x_low, x_high = x_values(i, j)
                if words:
                    return x86.lane_word_dot(builder, VNNI, x86.lane_word_dot(builder, VNNI, start, low, x_low), high, x_high)
                return x86.lane_dot(builder, VNNI, start, low, x_low, high, x_high)

            for group, acc in zip(groups, accs):
                if quads:  # lane 4h + p: pair p's block h of the step
                    members = group + group[:1] * (4 - len(group))  # padding: lanes never read
                    block_of_lane = [(p, h) for h in range(2) for p in range(4)]  # element h of a row's scales
                    lane_of_block = [(p, 4 * h) for p, h in block_of_lane]  # a token's lane 4h: block h
                    if WORD_SUMS and fmt in ("q4_0", "q4_m"):
                        sums = x86.quad_sum_words(builder, [x86.pair_sums(builder, *row_codes[i], *x_values(i, j)) for i, j in group])
                    else:
                        sums = x86.quad_sum(builder, [lane_sums(i, j, fix=False) for i, j in group])
                    if xfix is not None:  # each block's fix, the same in all its lanes
                        fix = _pick_lanes(builder, [x_fixes[j] for _, j in members], lane_of_block)
                        sums = builder.add(sums, builder.shl(fix, splat(I32, lanes, 2)) if fmt == "q6_0" else fix)
                    weight = _widen_scales(builder, _pick_lanes(builder, [row_scales[i] for i, _ in members], block_of_lane), fmt, lanes)
                    x_scale = _pick_lanes(builder, [x_scales[j] for _, j in members], lane_of_block)
                else:
                    (i, j), = group
                    sums = lane_sums(i, j)
                    weight = _widen_scales(builder, _repeat_per_lane(builder, row_scales[i], lanes_per_block), fmt, lanes)
                    x_scale = x_scales[j]
                scales = builder.fmul(weight, x_scale)
                builder.store(builder.call(fmuladd, [builder.sitofp(sums, acc_type), scales, builder.load(acc)]), acc)
        for group, acc in zip(groups, accs):
            total = builder.load(acc)
            for p, (i, j) in enumerate(group):
                if quads:
                    lane = lambda k: builder.extract_element(total, ir.Constant(I32, k))  # noqa: E731
                    value = builder.fadd(lane(p), lane(4 + p))
                else:
                    value = _horizontal_sum(builder, total)
                at = builder.add(builder.mul(builder.add(token, const(j)), n_out), rows[i])
                builder.store(value, builder.gep(out.data, [at]))
        return context.get_dummy_value()

    return codegen


@intrinsic
def _tile(typingctx, parts, xq, xfix, xdx, row, token, n_steps, out, n_rows, n_tokens, fmt):
    """out[token + j, row + i] = the dot of row row+i with token token+j's rounded x over the
    first n_steps steps (no tail blocks, no bias, q4_m without its minimums), for i < n_rows and
    j < n_tokens (literal ints). parts: a weight's parts in PART_ORDER, fmt its format id (a
    literal); xq, xfix, xdx [T, ...] from quantize_activations; out float32 [T, R]."""
    name = _format_name(fmt)
    literal = types.IntegerLiteral
    if name is None or not isinstance(n_rows, literal) or not isinstance(n_tokens, literal):
        return None
    sig = types.none(parts, xq, xfix, xdx, types.intp, types.intp, types.intp, out, n_rows, n_tokens, fmt)
    return sig, _tile_codegen(name, n_rows.literal_value, n_tokens.literal_value)


# --- activations --------------------------------------------------------------------------------


@njit(fastmath=FASTMATH, cache=True, inline="always")
def block_rounding(x, t, c0, levels):
    """(scale, 1 / scale or 0) rounding the block x[t, c0:c0+32] to integers in -levels..levels.
    A NaN in the block makes the scale NaN, so every product it enters is NaN as in float
    arithmetic (`max` skips a NaN, whose rounding would then be a finite integer: damaged weights
    would give finite nonsense that `engine.check_finite` cannot see)."""
    amax = np.float32(0.0)
    nan = False
    for j in range(QK):
        value = abs(x[t, c0 + j])
        amax = max(amax, value)
        nan |= value != value
    scale = np.float32(np.nan) if nan else amax / np.float32(levels)
    return scale, (np.float32(levels) / amax if amax > 0 else np.float32(0.0))


@njit(fastmath=FASTMATH, cache=True)
def quantize_activations(x, xq, xfix, xdx):
    """x float32 [T, C] -> xq int8 [T, C], xfix int32 [T, C/8], xdx float32 [T, C/8] for the 4- and
    6-bit kernels (layouts in the module docstring): per block of 32, scale = max |x| / 127 and
    q = round(x / scale)."""
    S = BLOCKS_PER_STEP
    n_blocks = x.shape[1] // QK
    whole = n_blocks // S * S
    for t in range(x.shape[0]):
        for b in range(n_blocks):
            c0 = b * QK
            scale, inverse = block_rounding(x, t, c0, 127)
            if b < whole:
                step_at = (b // S) * S * QK
                low_at = step_at + (b % S) * 16
                high_at = low_at + S * 16
            else:
                low_at = c0
                high_at = c0 + 16
            block_fix = 0
            for g in range(LANES_PER_BLOCK):
                fix = 0
                for j in range(4 * g, 4 * g + 4):
                    q_low = np.int8(np.rint(x[t, c0 + j] * inverse))
                    q_high = np.int8(np.rint(x[t, c0 + 16 + j] * inverse))
                    xq[t, low_at + j] = q_low
                    xq[t, high_at + j] = q_high
                    fix += np.int32(q_low) + np.int32(q_high)
                if not QUADS:
                    xfix[t, LANES_PER_BLOCK * b + g] = -8 * fix
                xdx[t, LANES_PER_BLOCK * b + g] = scale
                block_fix += fix
            if QUADS:  # the quads add a block's fix once, after summing its lanes
                for g in range(LANES_PER_BLOCK):
                    xfix[t, LANES_PER_BLOCK * b + g] = -8 * block_fix


@njit(fastmath=FASTMATH, cache=True)
def quantize_activations_words(x, xq, xdx):
    """x float32 [T, C] -> xq int16 [T, C], xdx float32 [T, C/4] for the q8_0 kernel: per block of
    32, scale = max |x| / 32767 and q = round(x / scale). A step's WORD_BLOCKS blocks are stored
    as their values 0..15, then their values 16..31 (blocks after the last whole step in natural
    order); xdx holds each block's scale once per int32 lane (8 per block)."""
    n_blocks = x.shape[1] // QK
    whole = n_blocks // WORD_BLOCKS * WORD_BLOCKS
    for t in range(x.shape[0]):
        for b in range(n_blocks):
            scale, inverse = block_rounding(x, t, QK * b, 32767)
            for lane in range(8 * b, 8 * b + 8):
                xdx[t, lane] = scale
            step_at = (b // WORD_BLOCKS) * WORD_BLOCKS * QK
            first_half = step_at + (b % WORD_BLOCKS) * 16 if b < whole else QK * b
            second_half = first_half + (WORD_BLOCKS * 16 if b < whole else 16)
            for j in range(16):
                xq[t, first_half + j] = np.int16(np.rint(x[t, QK * b + j] * inverse))
                xq[t, second_half + j] = np.int16(np.rint(x[t, QK * b + 16 + j] * inverse))


def _activations(fmt, x):
    """x [T, C] rounded for a weight's kernel (fmt: its format id, a literal): (xq, xfix, xdx) as
    quantize_activations makes them for the 4/6-bit formats; q8_0: xq int16 [T, C], xfix int32
    [T, 0], xdx float32 [T, C/4] (quantize_activations_words)."""


@overload(_activations, prefer_literal=True)
def _activations_impl(fmt, x):
    if _format_name(fmt) is None:
        return None
    if _format_name(fmt) == "q8_0":

        def words(fmt, x):
            T, C = x.shape
            xq = np.empty((T, C), np.int16)
            xdx = np.empty((T, C // 4), np.float32)
            quantize_activations_words(x, xq, xdx)
            return xq, np.empty((T, 0), np.int32), xdx

        return words

    def nibbles(fmt, x):
        T, C = x.shape
        xq = np.empty((T, C), np.int8)
        xfix = np.empty((T, C // 8), np.int32)
        xdx = np.empty((T, C // 8), np.float32)
        quantize_activations(x, xq, xfix, xdx)
        return xq, xfix, xdx

    return nibbles


def _geometry(fmt):
    """(blocks per vector step, int32 lanes per block) of a format's integer kernel (fmt: its id,
    a literal)."""


@overload(_geometry, prefer_literal=True)
def _geometry_impl(fmt):
    if _format_name(fmt) is None:
        return None
    if _format_name(fmt) == "q8_0":
        return lambda fmt: (WORD_BLOCKS, QK // 4)
    return lambda fmt: (BLOCKS_PER_STEP, LANES_PER_BLOCK)


@njit(cache=True, inline="always")
def _fix_sum(xfix, b):
    """-8 x the sum of block b's rounded x, from xfix (module docstring)."""
    if QUADS:
        return xfix[4 * b]
    return xfix[4 * b] + xfix[4 * b + 1] + xfix[4 * b + 2] + xfix[4 * b + 3]


@njit(cache=True, inline="always")
def _nibble_dot(qs, row, b, xq):
    """Block b's 4-bit codes . xq in natural order (a block after the last whole step), int."""
    total = 0
    for j in range(16):
        v = np.int32(qs[row, 16 * b + j])
        total += (v & 15) * np.int32(xq[QK * b + j]) + (v >> 4) * np.int32(xq[QK * b + 16 + j])
    return total


@njit(cache=True, inline="always")
def _q6_dot(ql, qh, row, b, xq):
    """As _nibble_dot with q6_0's high bits added (qh byte j, bits 2k..2k+1: value j + 8k)."""
    total = 0
    for j in range(QK):
        v = np.int32(ql[row, 16 * b + j % 16])
        low = v & 15 if j < 16 else v >> 4
        high = (np.int32(qh[row, 8 * b + j % 8]) >> (2 * (j // 8))) & 3
        total += (low + 16 * high) * np.int32(xq[QK * b + j])
    return total


@njit(cache=True, inline="always")
def _word_block_dot(qs, row, b, xq):
    """Block b's q8_0 codes . xq (int16, natural order: a block after the last whole step), int."""
    total = 0
    for j in range(QK * b, QK * b + QK):
        total += np.int32(qs[row, j]) * np.int32(xq[j])
    return total


# --- the driver: out [T, R] = x [T, C] @ W.T + bias. Every (row, token) sum is computed by the
# same sequence of operations whatever the tile shape and the number of tokens, so a token's
# result never depends on which other tokens share its call (prompt-lookup decoding and prompt
# reuse rely on it). -------------------------------------------------------------------------------


def _block_tail(parts, r, b, xq, xfix, fmt):
    """Block b's (after the last whole step) contribution to row r's dot, before x's scale."""


@overload(_block_tail, prefer_literal=True)
def _block_tail_impl(parts, r, b, xq, xfix, fmt):
    name = _format_name(fmt)
    if name == "q4_0":
        return lambda parts, r, b, xq, xfix, fmt: f16_to_f32(parts[1][r, b]) * np.float32(
            _nibble_dot(parts[0], r, b, xq) + _fix_sum(xfix, b)
        )
    if name == "q4_m":
        return lambda parts, r, b, xq, xfix, fmt: np.float32(parts[1][r, b]) * np.float32(_nibble_dot(parts[0], r, b, xq))
    if name == "q6_0":
        return lambda parts, r, b, xq, xfix, fmt: f16_to_f32(parts[2][r, b]) * np.float32(
            _q6_dot(parts[0], parts[1], r, b, xq) + 4 * _fix_sum(xfix, b)
        )
    if name == "q8_0":
        return lambda parts, r, b, xq, xfix, fmt: f16_to_f32(parts[1][r, b]) * np.float32(_word_block_dot(parts[0], r, b, xq))
    return None


def _block_sums(xfix, xdx, fmt):
    """[T, n_blocks] float32: what the format's last terms need of each block of x; q4_m: the
    sums of x's rounded values times x's block scale, [T, 0] for the others."""


@overload(_block_sums, prefer_literal=True)
def _block_sums_impl(xfix, xdx, fmt):
    if _format_name(fmt) is None:
        return None
    if _format_name(fmt) != "q4_m":
        return lambda xfix, xdx, fmt: np.empty((xdx.shape[0], 0), np.float32)

    def q4_m(xfix, xdx, fmt):
        # The minimums meet the sums of x's int8 values (xfix / -8), not of x itself, so that the
        # result is W @ (x as rounded) and the codes' large mean cancels exactly (float sums of x:
        # ~2.5x the error, measured).
        n_blocks = xdx.shape[1] // LANES_PER_BLOCK
        sums = np.empty((xdx.shape[0], n_blocks), np.float32)
        for t in range(xdx.shape[0]):
            for b in range(n_blocks):
                sums[t, b] = xdx[t, 4 * b] * np.float32(_fix_sum(xfix[t], b))
        return sums

    return q4_m


def _finish_row(parts, r, total, block_sums, fmt):
    """Row r's output (before the bias) from its summed dot `total` and one token's _block_sums."""


@overload(_finish_row, prefer_literal=True)
def _finish_row_impl(parts, r, total, block_sums, fmt):
    if _format_name(fmt) is None:
        return None
    if _format_name(fmt) != "q4_m":
        return lambda parts, r, total, block_sums, fmt: total

    def q4_m(parts, r, total, block_sums, fmt):
        mn, d, dmin = parts[2], parts[3], parts[4]
        minimums = np.float32(0.0)
        for b in range(block_sums.shape[0]):  # contiguous in both: vectorised
            minimums += np.float32(mn[r, b]) * block_sums[b]
        return d[r, 0] * total + np.float32(0.125) * dmin[r, 0] * minimums

    return q4_m


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _finish(parts, xq, xfix, xdx, block_sums, n_steps, r, t, bias, out, fmt):
    """out[t, r] (the tiles' sum) += the blocks after the last whole step, the format's last
    terms and the bias."""
    blocks_per_step, lanes_per_block = _geometry(fmt)
    total = out[t, r]
    for b in range(n_steps * blocks_per_step, xdx.shape[1] // lanes_per_block):
        total += xdx[t, lanes_per_block * b] * _block_tail(parts, r, b, xq[t], xfix[t], fmt)
    out[t, r] = _finish_row(parts, r, total, block_sums[t], fmt) + bias[r]


DECODE_ROWS = 4  # rows of a one-token tile: one parallel job streams this many rows at once
# A prompt's tile (rows x tokens) per format. With 32 vector registers (AVX-512) a 4 x 3 tile keeps
# its 12 accumulators and the tokens' x in registers (4 x 4 spills). With 16 (AVX2) the 256-bit kernels' quads (one accumulator for 4 rows) let
# 4 x 3 fit too, except for q6_0, whose high bits take two more vectors a row: one row against 8
# tokens (two token quads) there.
REGISTERS = 32 if ISA == "vnni512" or "avx512f" in compile_features() else 16
PROMPT_TILE = {fmt: (4, 3) for fmt in FORMATS}
if REGISTERS == 16:
    PROMPT_TILE["q6_0"] = (1, 8)
PANEL_ROWS = 64  # rows a thread takes through all the tokens before the next rows, so that they
# stay in L2 while each group of tokens' x stays in L1


def _panel(parts, xq, xfix, xdx, n_steps, panel, out, fmt):
    """Rows panel * PANEL_ROWS .. +PANEL_ROWS (fewer in the last panel) of out [T, R], every
    token, before _finish: whole tiles of the format's prompt tile shape, then 1-row and 1-token
    tiles for what is left."""


@overload(_panel, prefer_literal=True)
def _panel_impl(parts, xq, xfix, xdx, n_steps, panel, out, fmt):
    if _format_name(fmt) is None:
        return None
    tile_rows, tile_tokens = PROMPT_TILE[_format_name(fmt)]

    def run(parts, xq, xfix, xdx, n_steps, panel, out, fmt):
        T, R = out.shape
        first = panel * PANEL_ROWS
        last = min(first + PANEL_ROWS, R)
        whole_rows = first + (last - first) // tile_rows * tile_rows
        whole_tokens = T // tile_tokens * tile_tokens
        for token in range(0, whole_tokens, tile_tokens):  # these tokens' x in L1, the panel in L2
            for row in range(first, whole_rows, tile_rows):
                _tile(parts, xq, xfix, xdx, row, token, n_steps, out, tile_rows, tile_tokens, fmt)
            for row in range(whole_rows, last):
                for t in range(token, token + tile_tokens):
                    _tile(parts, xq, xfix, xdx, row, t, n_steps, out, 1, 1, fmt)
        # The 1 or 2 tokens after the last whole tile go through tiles of all the tile's rows too,
        # not 1 x 1 tiles (a batched decode step of 8 tokens is their common case).
        left = T - whole_tokens
        if tile_rows > 1 and left == 2:
            for row in range(first, whole_rows, tile_rows):
                _tile(parts, xq, xfix, xdx, row, whole_tokens, n_steps, out, tile_rows, 2, fmt)
        elif tile_rows > 1 and left == 1:
            for row in range(first, whole_rows, tile_rows):
                _tile(parts, xq, xfix, xdx, row, whole_tokens, n_steps, out, tile_rows, 1, fmt)
        for t in range(whole_tokens, T):
            for row in range(whole_rows if tile_rows > 1 and left <= 2 else first, last):
                _tile(parts, xq, xfix, xdx, row, t, n_steps, out, 1, 1, fmt)

    return run


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_blocks(parts, x, bias, out, fmt):
    """out [T, R] = x [T, C] @ W.T + bias [R] for a block-quantized weight given as its parts tuple
    (PART_ORDER of formats.blocks) and its format id (a literal); x, bias, out float32."""
    xq, xfix, xdx = _activations(fmt, x)
    block_sums = _block_sums(xfix, xdx, fmt)
    blocks_per_step, lanes_per_block = _geometry(fmt)
    T = x.shape[0]
    R = parts[0].shape[0]
    n_steps = xdx.shape[1] // lanes_per_block // blocks_per_step
    if T == 1:  # decode: stream the rows, DECODE_ROWS at a time, in one parallel region
        n_tiles = R // DECODE_ROWS
        for tile in prange(n_tiles):
            _tile(parts, xq, xfix, xdx, tile * DECODE_ROWS, 0, n_steps, out, DECODE_ROWS, 1, fmt)
            for r in range(tile * DECODE_ROWS, (tile + 1) * DECODE_ROWS):
                _finish(parts, xq, xfix, xdx, block_sums, n_steps, r, 0, bias, out, fmt)
        for r in range(n_tiles * DECODE_ROWS, R):  # the (at most 3) rows after the last whole tile
            _tile(parts, xq, xfix, xdx, r, 0, n_steps, out, 1, 1, fmt)
            _finish(parts, xq, xfix, xdx, block_sums, n_steps, r, 0, bias, out, fmt)
    else:
        for panel in prange((R + PANEL_ROWS - 1) // PANEL_ROWS):
            _panel(parts, xq, xfix, xdx, n_steps, panel, out, fmt)
        for t in prange(T):  # along out's rows (a token's outputs are contiguous)
            for r in range(R):
                _finish(parts, xq, xfix, xdx, block_sums, n_steps, r, t, bias, out, fmt)


def matmul(qtype: str, args: tuple, x, bias, out) -> None:
    """out [T, R] = x [T, C] @ W.T + bias for a `qtype` weight given as its kernel arguments
    (kernels.kernel_args), through this module's integer kernels."""
    _product_kernel(BLOCK_FORMATS[qtype].format_id)(tuple(args), x, bias, out)


@functools.cache
def _product_kernel(fmt: int):
    """matmul_blocks with the format id bound as a constant (a plain int passed from Python would
    make Numba retry its typing on every call before taking the literal version)."""

    @njit(cache=True)
    def product(parts, x, bias, out):
        matmul_blocks(parts, x, bias, out, fmt)

    return product
