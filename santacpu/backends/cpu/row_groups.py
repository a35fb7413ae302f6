"""Products on row groups, for AVX2 CPUs without VNNI: at load, the codes of every 8 rows of a
q4_0, q4_m, q6_0 or q8_0 weight are interleaved so that each int32 lane of a 256-bit vector
belongs to one row.

Why: the kernels of `int_dot.py` keep a row's codes in a vector's lanes, so each block's lanes
must be summed across (vphaddw, shuffles) before its scale applies. On AVX2 those sums, shared by
4 (row, token) pairs, still took over half of a step's instructions. Here one vector holds 4 code
bytes (8 values) of each of 8 rows, and x's 4 matching values are broadcast to every lane: each
`vpmaddubsw` adds pair products into the lanes of their own rows, the block's 8 of them are
summed as int16 (at most 8 x 2 x 15 x 127 = 30480), one `vpmaddwd` widens them, and the block's
8 row sums are complete with no reduction across lanes. Scaling is one multiply-add on 8 rows.
q6_0's codes add 2 high bits to each nibble (their pair products reach 2 x 63 x 127, so every
two are widened by a `vpmaddwd`). q8_0 the same way with int16: a piece of 2 codes of each of 8
rows, widened (`vpmovsxbw`), meets x's 2 matching int16 values in one `vpmaddwd`, 16 pieces a
block summed as int32 (int_dot paid a conversion and two float operations per row and block,
and a reduction per row).

Layout (`interleave_codes`), per group g of 8 rows and block b: 4 vectors of 32 bytes; vector v
holds, in its int32 lane i, row 8g+i's code bytes 4v..4v+3 of the block (byte j of a block holds
value j in its low nibble and value j+16 in its high one, in both formats). Each per-block part
(q4_0's fp16 scales; q4_m's scale and minimum codes) holds the group's 8 rows of block b in a
row; q4_m's per-row d and dmin are padded to whole groups. Rows past the last (a weight whose
rows are not a multiple of 8) have scale 0 (q4_0 codes 0x88, value 0). q8_0
(`interleave_words`): per group and block, 16 pieces of 16 bytes, piece p holding values 2p and
2p+1 of each row in turn, and the fp16 scales as q4_0's. q6_0 (`interleave_six_bits`): q4_0's
nibble vectors, then two vectors of high bits per block.
x is rounded per block as int_dot rounds it for the format (max |x| -> 127; q8_0: 32767, int16),
but kept in its natural order; q4_0's offset 8 enters as -8 x the block's sum of rounded x, and
q4_m's minimums meet that sum (as in int_dot) in a second accumulator: out = d acc + dmin/8
acc_min.

Every (row, token) result comes from the same operations whatever the number of tokens in the
call and its tile (blocks in order, one fused multiply-add each), so a token's result never
depends on its call, as for `int_dot.py`. The fused multiply-adds are explicit (`llvm.fma`) and
the tiles are compiled without fast-math flags, which would let LLVM contract or reorder them
differently in tiles of different shapes (q4_m's results did differ with them).

The interleaved copy replaces the file's pages in memory: `group_rows` drops them from the
process after copying (`release_mapped_pages`), so a model is never resident twice.

May import: numba, llvmlite, numpy, the CPU kernel modules `int_dot`, `cpu_kernels`,
`santacpu.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ...formats.blocks import QK, QuantizedWeight
from ...formats.safetensors_io import release_mapped_pages
from . import int_dot
from .cpu_kernels import FASTMATH, _f16_to_f32
from .int_dot import _F32, _I8, _I16, _I32, _block_rounding, _declare, _load_vector, _splat

GROUP = 8  # rows per group: one int32 lane each of a 256-bit vector
GROUP_BLOCK_BYTES = GROUP * QK // 2  # 128 code bytes per group and block (4-bit)
WORD_BLOCK_BYTES = GROUP * QK  # 256 (q8_0)
SIX_BIT_BLOCK_BYTES = GROUP_BLOCK_BYTES + 2 * 32  # 192 (q6_0: the nibbles, then the high bits)
# The backend uses row groups on CPUs whose best integer kernels are AVX2 ones (VNNI CPUs keep
# int_dot's, measured there); any AVX2 CPU can run them (the tests do).
RUNNABLE = "avx2" in int_dot._target_features()
USED = int_dot.ISA == "avx2"
FORMATS = ("q4_0", "q4_m", "q6_0", "q8_0")
# A one-token product streams the weight from memory: each block prefetches its 2 cache lines
# this far ahead (the next groups' codes, in address order).
PREFETCH_BYTES = 4096
CHUNK_ROWS = 1024  # rows interleaved at a time at load (a multiple of GROUP)
CODE_PARTS = {"q4_0": ("qs",), "q4_m": ("qs",), "q6_0": ("ql", "qh"), "q8_0": ("qs",)}  # interleaved by rows
TILE_TOKENS = 4  # tokens per tile of a many-token product: their accumulators fit the registers
PANEL_GROUPS = 8  # groups a thread takes through all the tokens (64 rows stay in L2)


@dataclass(frozen=True)
class RowGroupWeight:
    """A weight [R, C] as row groups (module docstring), G = ceil(R / 8) groups: `parts` = (codes
    uint8 [G, C/32 * 128] (q8_0: int8 [G, C/32 * 256]; q6_0: uint8 [G, C/32, 192]), then q4_0,
    q6_0, q8_0: scales uint16 (fp16 bits) [G, C/32 * 8]; q4_m: scale codes, minimum codes uint8
    [G, C/32 * 8], d, dmin float32 [8 G]). `source`: the weight as loaded."""

    source: QuantizedWeight
    parts: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.source.shape

    @property
    def qtype(self) -> str:
        return self.source.qtype

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


def group_rows(weight: QuantizedWeight) -> RowGroupWeight:
    """`weight` (one of FORMATS) interleaved into row groups; the pages of its file mapping are
    dropped from this process afterwards (they stay in the page cache)."""
    if weight.qtype not in FORMATS:
        raise ValueError(f"row groups hold {', '.join(FORMATS)} weights, not {weight.qtype}")
    R, C = weight.shape
    n_groups, n_blocks = -(-R // GROUP), C // QK
    if weight.qtype == "q8_0":
        codes = np.empty((n_groups, n_blocks * WORD_BLOCK_BYTES), np.int8)
    elif weight.qtype == "q6_0":  # 3-D, to tell its parts' types from q4_0's
        codes = np.empty((n_groups, n_blocks, SIX_BIT_BLOCK_BYTES), np.uint8)
    else:
        codes = np.empty((n_groups, n_blocks * GROUP_BLOCK_BYTES), np.uint8)
    # A chunk of rows at a time, its source pages dropped right after: the file's pages and the
    # copy are never both resident for more than a chunk (a whole LM head would add ~100 MB to
    # the peak).
    code_names = CODE_PARTS[weight.qtype]
    for first in range(0, R, CHUNK_ROWS):
        last = min(first + CHUNK_ROWS, R)
        chunk = codes[first // GROUP : -(-last // GROUP)]
        sources = [weight.parts[name][first:last] for name in code_names]
        if weight.qtype == "q8_0":
            interleave_words(*sources, chunk)
        elif weight.qtype == "q6_0":
            interleave_six_bits(*sources, chunk)
        else:
            interleave_codes(*sources, chunk, 0x88 if weight.qtype == "q4_0" else 0)
        for source in sources:
            release_mapped_pages(source)
    if weight.qtype in ("q4_0", "q6_0", "q8_0"):
        per_block = [weight.parts["d"].view(np.uint16)]
    else:
        per_block = [weight.parts["sc"], weight.parts["mn"]]
    parts = [codes]
    for part in per_block:
        parts.append(np.empty((n_groups, n_blocks * GROUP), part.dtype))
        interleave_blocks(part, parts[-1])
    if weight.qtype == "q4_m":
        for name in ("d", "dmin"):
            padded = np.zeros(n_groups * GROUP, np.float32)
            padded[:R] = weight.parts[name][:, 0]
            parts.append(padded)
    for name, part in weight.parts.items():
        if name not in code_names:  # the codes' pages went chunk by chunk
            release_mapped_pages(part)
    return RowGroupWeight(weight, tuple(parts))


@njit(parallel=True, cache=True)
def interleave_codes(qs, codes, padding):
    """qs uint8 [R, C/2] (4-bit codes, 16 bytes a block) -> codes [G, C/32 * 128] (module
    docstring); rows past R: `padding`."""
    R = qs.shape[0]
    n_blocks = qs.shape[1] // 16
    for g in prange(codes.shape[0]):
        for b in range(n_blocks):
            for i in range(GROUP):
                r = GROUP * g + i
                for v in range(4):
                    for m in range(4):
                        code = qs[r, 16 * b + 4 * v + m] if r < R else padding
                        codes[g, GROUP_BLOCK_BYTES * b + 32 * v + 4 * i + m] = code


@njit(parallel=True, cache=True)
def interleave_six_bits(ql, qh, codes):
    """q6_0's ql uint8 [R, C/2], qh uint8 [R, C/8] -> codes uint8 [G, C/32, 192]: per block, the
    low nibbles as interleave_codes places them (bytes 0..127), then two vectors of high bits
    (bytes 128..159 for the values in low nibbles, 160..191 for those in high nibbles): byte 4i + m
    of each holds, in bits 2v..2v+1, the high 2 bits of the value that sits in byte 4i + m of
    nibble vector v (row i); rows past R: 0."""
    R = ql.shape[0]
    for g in prange(codes.shape[0]):
        for b in range(codes.shape[1]):
            for i in range(GROUP):
                r = GROUP * g + i
                for m in range(4):
                    low_bits, high_bits = 0, 0
                    for v in range(4):
                        byte = ql[r, 16 * b + 4 * v + m] if r < R else 0
                        codes[g, b, 32 * v + 4 * i + m] = byte
                        for half in range(2):  # values 4v+m and 16+4v+m
                            value = 16 * half + 4 * v + m
                            top = (qh[r, 8 * b + value % 8] >> (2 * (value // 8))) & 3 if r < R else 0
                            if half == 0:
                                low_bits |= top << (2 * v)
                            else:
                                high_bits |= top << (2 * v)
                    codes[g, b, GROUP_BLOCK_BYTES + 4 * i + m] = low_bits
                    codes[g, b, GROUP_BLOCK_BYTES + 32 + 4 * i + m] = high_bits


@njit(parallel=True, cache=True)
def interleave_words(qs, codes):
    """q8_0's qs int8 [R, C] -> codes int8 [G, C/32 * 256]: block b of group g is 16 pieces of 16
    bytes, piece p holding values 2p and 2p+1 of each of the 8 rows in a row (as int16, one int32
    lane a row); rows past R: 0."""
    R = qs.shape[0]
    n_blocks = qs.shape[1] // QK
    for g in prange(codes.shape[0]):
        for b in range(n_blocks):
            for i in range(GROUP):
                r = GROUP * g + i
                for p in range(QK // 2):
                    for k in range(2):
                        codes[g, WORD_BLOCK_BYTES * b + 16 * p + 2 * i + k] = qs[r, QK * b + 2 * p + k] if r < R else 0


@njit(cache=True)
def interleave_blocks(part, grouped):
    """A per-block part [R, C/32] -> [G, C/32 * 8]: block b of group g holds its 8 rows' values
    (0 past R)."""
    R, n_blocks = part.shape
    for g in range(grouped.shape[0]):
        for b in range(n_blocks):
            for i in range(GROUP):
                r = GROUP * g + i
                grouped[g, GROUP * b + i] = part[r, b] if r < R else 0


@njit(fastmath=FASTMATH, cache=True)
def round_natural(x, xq, xfix, xdx, first, last):
    """Tokens first..last-1 of x float32 [T, C] -> xq int8 [T, C] (natural order), xfix int32
    [T, C/32] (-8 x each block's sum of xq), xdx float32 [T, C/32] (the block scales)."""
    for t in range(first, last):
        for b in range(x.shape[1] // QK):
            scale, inverse = _block_rounding(x, t, QK * b, 127)
            total = 0
            for j in range(QK * b, QK * b + QK):
                q = np.int8(np.rint(x[t, j] * inverse))
                xq[t, j] = q
                total += np.int32(q)
            xfix[t, b] = -8 * total
            xdx[t, b] = scale


@njit(fastmath=FASTMATH, cache=True)
def round_natural_words(x, xq, xdx, first, last):
    """As round_natural for q8_0: xq int16 [T, C] (max |x| -> 32767, int_dot's rounding for q8_0)."""
    for t in range(first, last):
        for b in range(x.shape[1] // QK):
            scale, inverse = _block_rounding(x, t, QK * b, 32767)
            for j in range(QK * b, QK * b + QK):
                xq[t, j] = np.int16(np.rint(x[t, j] * inverse))
            xdx[t, b] = scale


def _round(parts, x, first, last, xq, xfix, xdx):
    """Tokens first..last-1 of x rounded for a row-group weight's kernel (round_natural, or
    round_natural_words for q8_0, whose xfix stays unused)."""


@overload(_round)
def _round_impl(parts, x, first, last, xq, xfix, xdx):
    if _parts_format(parts) == "q8_0":
        return lambda parts, x, first, last, xq, xfix, xdx: round_natural_words(x, xq, xdx, first, last)
    return lambda parts, x, first, last, xq, xfix, xdx: round_natural(x, xq, xfix, xdx, first, last)


def _x_type(parts):
    """The integer type a row-group weight's kernel rounds x to."""


@overload(_x_type)
def _x_type_impl(parts):
    if _parts_format(parts) == "q8_0":
        return lambda parts: np.int16
    return lambda parts: np.int8


def _group_tile_codegen(fmt, n_tokens):
    """Codegen of _group_tile for a format and a literal number of tokens."""
    minimums = fmt == "q4_m"
    words = fmt == "q8_0"  # int8 codes widened to int16 against x rounded to int16
    six_bits = fmt == "q6_0"
    block_bytes = {"q8_0": WORD_BLOCK_BYTES, "q6_0": SIX_BIT_BLOCK_BYTES}.get(fmt, GROUP_BLOCK_BYTES)

    def codegen(context, builder, signature, args):
        parts_type = signature.args[0]
        parts = [
            context.make_array(t)(context, builder, v)
            for t, v in zip(parts_type.types, cgutils.unpack_tuple(builder, args[0], len(parts_type.types)))
        ]
        xq, xfix, xdx, bias, out = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (1, 2, 3, 4, 7))
        codes, scales = parts[0], parts[1]
        group, token = args[5], args[6]
        intp = group.type
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        lane = lambda v: ir.Constant(_I32, v)  # noqa: E731
        n_blocks = cgutils.unpack_tuple(builder, xdx.shape, 2)[1]
        x_cols = cgutils.unpack_tuple(builder, xq.shape, 2)[1]
        n_rows = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        vec8, vec16, vec32, vecf = (ir.VectorType(t, n) for t, n in ((_I8, 32), (_I16, 16), (_I32, 8), (_F32, 8)))
        pmaddubsw = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", vec16, vec8, vec8)
        pmaddwd = _declare(builder, "llvm.x86.avx2.pmadd.wd", vec32, vec16, vec16)
        fma = _declare(builder, "llvm.fma.v8f32", vecf, vecf, vecf, vecf)
        prefetch = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), _I8.as_pointer(), _I32, _I32, _I32)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vecf, None)) for _ in range(n_tokens)]
        min_accs = [cgutils.alloca_once_value(builder, ir.Constant(vecf, None)) for _ in range(n_tokens)] if minimums else []
        group_codes = builder.mul(group, builder.mul(n_blocks, const(block_bytes)))
        group_blocks = builder.mul(group, builder.mul(n_blocks, const(GROUP)))
        x_rows = [builder.mul(builder.add(token, const(j)), x_cols) for j in range(n_tokens)]
        block_rows = [builder.mul(builder.add(token, const(j)), n_blocks) for j in range(n_tokens)]

        def broadcast(value, vector_type):
            """value in every lane of vector_type (whose lanes have value's type)."""
            single = builder.insert_element(ir.Constant(vector_type, None), value, lane(0))
            return builder.shuffle_vector(single, ir.Constant(vector_type, None), ir.Constant(vec32, [0] * 8))

        def x_word(at):
            """4 int8 (q8_0: 2 int16) values of xq from flat index `at`, in every int32 lane, as
            <32 x i8> (<16 x i16>)."""
            word = builder.load(builder.bitcast(builder.gep(xq.data, [at]), _I32.as_pointer()), align=1)
            return builder.bitcast(broadcast(word, vec32), vec16 if words else vec8)

        def per_block(part, at):
            """The group's 8 values of a per-block part at block offset `at`, as <8 x float>."""
            if part is scales and not minimums:  # fp16 bits
                raw = _load_vector(builder, part.data, at, _I16, GROUP)
                return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), GROUP)), vecf)
            return builder.uitofp(_load_vector(builder, part.data, at, _I8, GROUP), vecf)

        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            code_at = builder.add(group_codes, builder.mul(b, const(block_bytes)))
            if n_tokens == 1:  # decode streams the codes: their lines PREFETCH_BYTES ahead
                for line in range(block_bytes // 64):
                    ahead = builder.gep(codes.data, [builder.add(code_at, const(PREFETCH_BYTES + 64 * line))])
                    builder.call(prefetch, [builder.bitcast(ahead, _I8.as_pointer()), lane(0), lane(3), lane(1)])
            block_at = builder.add(group_blocks, builder.mul(b, const(GROUP)))
            weight_scales = per_block(scales, block_at)
            weight_minimums = per_block(parts[2], block_at) if minimums else None
            x_ats = [builder.add(x_rows[j], builder.mul(b, const(QK))) for j in range(n_tokens)]
            if words:  # piece p: values 2p, 2p+1 of the 8 rows, against x's 2 in every lane
                word_sums = [ir.Constant(vec32, None)] * n_tokens
                for p in range(QK // 2):
                    piece = _load_vector(builder, codes.data, builder.add(code_at, const(16 * p)), _I8, 16)
                    piece = builder.sext(piece, vec16)
                    for j in range(n_tokens):
                        product = builder.call(pmaddwd, [piece, x_word(builder.add(x_ats[j], const(2 * p)))])
                        word_sums[j] = builder.add(word_sums[j], product)
            else:
                packed = [_load_vector(builder, codes.data, builder.add(code_at, const(32 * v)), _I8, 32) for v in range(4)]
                lows = [builder.and_(p, _splat(_I8, 32, 0x0F)) for p in packed]
                highs = [builder.lshr(p, _splat(_I8, 32, 4)) for p in packed]
                if six_bits:  # bits 2v..2v+1 of each high-bits byte to bits 4-5, per 16-bit lane
                    for k, codes_v in enumerate((lows, highs)):
                        at = builder.add(code_at, const(GROUP_BLOCK_BYTES + 32 * k))
                        top = _load_vector(builder, codes.data, at, _I16, 16)
                        for v in range(4):
                            moved = top if v == 2 else (
                                builder.shl(top, _splat(_I16, 16, 4 - 2 * v)) if v < 2 else builder.lshr(top, _splat(_I16, 16, 2))
                            )
                            bits = builder.and_(builder.bitcast(moved, vec8), _splat(_I8, 32, 0x30))
                            codes_v[v] = builder.or_(codes_v[v], bits)
            for j in range(n_tokens):
                x_at = x_ats[j]
                if words:
                    sums = word_sums[j]
                elif six_bits:  # a pair of products up to 2 x 63 x 127: widened every 2 of them
                    sums = ir.Constant(vec32, None)
                    for v in range(4):
                        pairs = builder.add(
                            builder.call(pmaddubsw, [lows[v], x_word(builder.add(x_at, const(4 * v)))]),
                            builder.call(pmaddubsw, [highs[v], x_word(builder.add(x_at, const(16 + 4 * v)))]),
                        )
                        sums = builder.add(sums, builder.call(pmaddwd, [pairs, _splat(_I16, 16, 1)]))
                else:
                    pairs = ir.Constant(vec16, None)
                    for v in range(4):
                        pairs = builder.add(pairs, builder.call(pmaddubsw, [lows[v], x_word(builder.add(x_at, const(4 * v)))]))
                        pairs = builder.add(pairs, builder.call(pmaddubsw, [highs[v], x_word(builder.add(x_at, const(16 + 4 * v)))]))
                    sums = builder.call(pmaddwd, [pairs, _splat(_I16, 16, 1)])
                x_block = builder.add(block_rows[j], b)
                fix = None if words else builder.load(builder.gep(xfix.data, [x_block]))  # -8 x the block's sum of xq
                x_scale = builder.load(builder.gep(xdx.data, [x_block]))
                if minimums:  # the minimums meet x's block sum (times -8): exact ints, one scale
                    x_sum = broadcast(builder.fmul(builder.sitofp(fix, _F32), x_scale), vecf)
                    builder.store(builder.call(fma, [weight_minimums, x_sum, builder.load(min_accs[j])]), min_accs[j])
                elif six_bits:  # q6_0's offset 32
                    sums = builder.add(sums, broadcast(builder.shl(fix, ir.Constant(_I32, 2)), vec32))
                elif not words:  # q4_0's offset 8
                    sums = builder.add(sums, broadcast(fix, vec32))
                scale = builder.fmul(weight_scales, broadcast(x_scale, vecf))
                total = builder.call(fma, [builder.sitofp(sums, vecf), scale, builder.load(accs[j])])
                builder.store(total, accs[j])
        first_row = builder.mul(group, const(GROUP))
        if minimums:  # per-row super-scales
            d = _load_vector(builder, parts[3].data, first_row, _F32, GROUP)
            dmin = builder.fmul(_load_vector(builder, parts[4].data, first_row, _F32, GROUP), _splat(_F32, GROUP, 0.125))
        whole = builder.icmp_signed("<=", builder.add(first_row, const(GROUP)), n_rows)
        for j in range(n_tokens):
            total = builder.load(accs[j])
            if minimums:
                total = builder.call(fma, [dmin, builder.load(min_accs[j]), builder.fmul(d, total)])
            out_at = builder.add(builder.mul(builder.add(token, const(j)), n_rows), first_row)
            with builder.if_else(whole, likely=True) as (all_rows, some_rows):
                with all_rows:
                    value = builder.fadd(total, _load_vector(builder, bias.data, first_row, _F32, GROUP))
                    address = builder.bitcast(builder.gep(out.data, [out_at]), vecf.as_pointer())
                    builder.store(value, address, align=4)
                with some_rows:  # the last group of a weight whose rows are not a multiple of 8
                    for i in range(GROUP):
                        with builder.if_then(builder.icmp_signed("<", builder.add(first_row, const(i)), n_rows)):
                            bias_i = builder.load(builder.gep(bias.data, [builder.add(first_row, const(i))]))
                            value = builder.fadd(builder.extract_element(total, lane(i)), bias_i)
                            builder.store(value, builder.gep(out.data, [builder.add(out_at, const(i))]))
        return context.get_dummy_value()

    return codegen


def _parts_format(parts) -> str | None:
    """Which format a RowGroupWeight's parts tuple type holds."""
    if not isinstance(parts, types.BaseTuple) or not all(isinstance(p, types.Array) for p in parts):
        return None
    if tuple(p.ndim for p in parts) == (3, 2):
        return "q6_0" if tuple(str(p.dtype) for p in parts) == ("uint8", "uint16") else None
    return {
        ("uint8", "uint16"): "q4_0",
        ("int8", "uint16"): "q8_0",
        ("uint8", "uint8", "uint8", "float32", "float32"): "q4_m",
    }.get(
        tuple(str(p.dtype) for p in parts)
    )


@intrinsic
def _group_tile(typingctx, parts, xq, xfix, xdx, bias, group, token, out, n_tokens):
    """out[token + j, 8 group + i] = row 8 group + i . token token + j's rounded x + bias, for the
    group's rows (those < R) and j < n_tokens (a literal int). Arrays as matmul_groups has them."""
    fmt = _parts_format(parts)
    if fmt is None or not isinstance(n_tokens, types.IntegerLiteral):
        return None
    sig = types.none(parts, xq, xfix, xdx, bias, types.intp, types.intp, out, n_tokens)
    return sig, _group_tile_codegen(fmt, n_tokens.literal_value)


@njit(cache=True, inline="always")
def _tokens_tile(parts, xq, xfix, xdx, bias, group, token, out, n):
    """_group_tile for n = 1..TILE_TOKENS tokens (a run-time n to the literal it needs)."""
    if n == 4:
        _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 4)
    elif n == 3:
        _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 3)
    elif n == 2:
        _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 2)
    else:
        _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 1)


@njit(parallel=True, cache=True)  # no fast-math flags on the tiles: their float ops stay as written
def matmul_groups(parts, x, bias, out):
    """out [T, R] = x [T, C] @ W.T + bias [R] for W as row groups (its parts tuple); float32."""
    T, C = x.shape
    xq = np.empty((T, C), _x_type(parts))
    xfix = np.empty((T, C // QK), np.int32)
    xdx = np.empty((T, C // QK), np.float32)
    if T < 8:
        _round(parts, x, 0, T, xq, xfix, xdx)
    else:
        for t in prange(T):
            _round(parts, x, t, t + 1, xq, xfix, xdx)
    G = parts[0].shape[0]
    if T == 1:
        for g in prange(G):
            _group_tile(parts, xq, xfix, xdx, bias, g, 0, out, 1)
    else:
        for panel in prange((G + PANEL_GROUPS - 1) // PANEL_GROUPS):
            for token in range(0, T, TILE_TOKENS):  # these tokens' x in L1, the panel's codes in L2
                n = min(TILE_TOKENS, T - token)
                for g in range(panel * PANEL_GROUPS, min((panel + 1) * PANEL_GROUPS, G)):
                    _tokens_tile(parts, xq, xfix, xdx, bias, g, token, out, n)


def _block_values(parts, g, i, b, values):
    """values float32 [32] = block b of row i of group g, from a row-group weight's parts."""


@overload(_block_values)
def _block_values_impl(parts, g, i, b, values):
    fmt = _parts_format(parts)

    def q8_0(parts, g, i, b, values):
        d = _f16_to_f32(parts[1][g, GROUP * b + i])
        for p in range(QK // 2):
            for k in range(2):
                values[2 * p + k] = d * np.float32(parts[0][g, WORD_BLOCK_BYTES * b + 16 * p + 2 * i + k])

    def q6_0(parts, g, i, b, values):
        d, codes = _f16_to_f32(parts[1][g, GROUP * b + i]), parts[0]
        for v in range(4):
            for m in range(4):
                byte = np.int32(codes[g, b, 32 * v + 4 * i + m])
                low_top = (np.int32(codes[g, b, GROUP_BLOCK_BYTES + 4 * i + m]) >> (2 * v)) & 3
                high_top = (np.int32(codes[g, b, GROUP_BLOCK_BYTES + 32 + 4 * i + m]) >> (2 * v)) & 3
                values[4 * v + m] = d * (np.float32((byte & 15) + 16 * low_top) - np.float32(32.0))
                values[16 + 4 * v + m] = d * (np.float32((byte >> 4) + 16 * high_top) - np.float32(32.0))

    def nibbles(parts, g, i, b, values):
        at = GROUP * b + i
        if fmt == "q4_0":  # d (q - 8)
            scale, shift, offset = _f16_to_f32(parts[1][g, at]), np.float32(8.0), np.float32(0.0)
        else:  # q4_m: (d sc) q - dmin mn
            scale, shift = parts[3][GROUP * g + i] * np.float32(parts[1][g, at]), np.float32(0.0)
            offset = parts[4][GROUP * g + i] * np.float32(parts[2][g, at])
        for v in range(4):
            for m in range(4):
                byte = parts[0][g, GROUP_BLOCK_BYTES * b + 32 * v + 4 * i + m]
                values[4 * v + m] = scale * (np.float32(byte & 15) - shift) - offset
                values[16 + 4 * v + m] = scale * (np.float32(byte >> 4) - shift) - offset

    return {"q8_0": q8_0, "q6_0": q6_0}.get(fmt, nibbles)


@njit(cache=True)
def _dequantize_group_rows(parts, rows, out):
    for n in range(rows.shape[0]):
        g, i = rows[n] // GROUP, rows[n] % GROUP
        for b in range(out.shape[1] // QK):
            _block_values(parts, g, i, b, out[n, QK * b : QK * b + QK])


def dequantize_rows(weight: RowGroupWeight, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (ints < R) of a RowGroupWeight as float32 [len(rows), C], the values its
    format's `dequantize` gives (an embedding lookup from the grouped LM head)."""
    R, C = weight.shape
    rows = np.asarray(rows, np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= R):
        raise ValueError(f"rows of a [{R}, {C}] weight: got {rows.min()}..{rows.max()}")
    out = np.empty((len(rows), C), np.float32)
    _dequantize_group_rows(weight.parts, rows, out)
    return out


def matmul(weight: RowGroupWeight, x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """out [T, R] = x [T, C] @ W.T + bias [R] (float32, C-contiguous) for a RowGroupWeight."""
    R, C = weight.shape
    T = x.shape[0] if x.ndim == 2 else -1
    # The kernel does no bounds checks: a wrong shape here would read or write out of bounds.
    if x.shape != (T, C) or bias.shape != (R,) or out.shape != (T, R) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"row-group matmul [{R}, {C}]: got x {x.shape}, bias {bias.shape}, out {out.shape}")
    matmul_groups(weight.parts, np.ascontiguousarray(x, np.float32), np.ascontiguousarray(bias, np.float32), out)
