"""Repacking (as llama.cpp's `repack` names it): block-quantized weights interleaved into row
groups at load, and the products on them, the backend's integer kernels wherever the CPU has a
target (`target.py`): the codes of every n rows of a q4_0, q4_m, q6_0 or q8_0 weight are
interleaved so that each int32 lane of a vector belongs to one row (n = 4 for 128-bit vectors
(NEON, portable), 8 for 256-bit ones (AVX2, AVX-VNNI), 16 for 512-bit ones (AVX-512 VNNI)).

Why: kernels that keep a row's codes in a vector's lanes (the first integer kernels) must sum each block's
lanes across (shuffles, horizontal adds) and scale per row and block, over half of a step's
instructions. Here one vector holds 4 code bytes (8 values) of each of n rows, and x's 4 matching
values are broadcast to every lane, so a block's products land in the lanes of their own rows:
no reduction across lanes, and the scaling is one multiply-add on n rows. The integer products
of a block come from the target's instruction-set module (`isa/`: x86 `vpmaddubsw` chains or
`vpdpbusd`, ARM64 `sdot` or `smmla`, portable IR); all compute the same exact int32 sums, so
every target gives the same bits.

Layout (4-bit codes), per group g of n rows and block b: 4 vectors of 4n bytes; vector v
holds, in its int32 lane i, row ng+i's code bytes 4v..4v+3 of the block (byte j of a block holds
value j in its low nibble and value j+16 in its high one, in both formats). Each per-block part
(q4_0's fp16 scales; q4_m's scale and minimum codes) holds the group's n rows of block b in a
row; q4_m's per-row d and dmin are padded to whole groups. Rows past the last (a weight whose
rows are not a multiple of n) have scale 0 (q4_0 codes 0x88, value 0). q8_0: per group and
block, 16 pieces of 2n bytes, piece p holding values 2p and 2p+1 of each row in turn (n = 8, 16:
`vpmaddwd`'s int16 pairs), or with 4 rows a group (NEON's `sdot`, portable) and for the VNNI
tiles of int8 x, 8 vectors of 4n bytes, vector k holding values 4k..4k+3 of each row in turn
(`q8_0_word_bytes`); the fp16 scales as q4_0's. All of these are one word-by-word interleave of
the group's rows (`interleave_rows`). q6_0 (`interleave_six_bits`): q4_0's nibble vectors, then
two vectors of high bits per block.

x is rounded per block as int_dot rounds it for the format (max |x| -> 127; q8_0: 32767, int16),
but kept in its natural order; q4_0's offset 8 enters as -8 x the block's sum of rounded x, and
q4_m's minimums meet that sum in a second accumulator: out = d acc + dmin/8
acc_min. A q8_0 weight grouped with `int8_x` rounds x to int8 instead (max |x| -> 127; the
backend's target chooses which matrices, `CpuTarget.int8_x_roles`): its kernel id is
Q8_0_INT8_X, whose VNNI tiles add 128 to each code (unsigned, as `vpdpbusd` takes them) and start
each block's sum from -128 x x's block sum, as q4_0's offset; the other targets run their int16
tiles on x's int8 values (the same sums). The kernel id and the instruction set reach the kernels
as literal constants: each pair compiles its own code.

Every (row, token) result comes from the same operations whatever the number of tokens in the
call and its tile (blocks in order, one fused multiply-add each), so a token's result never
depends on its call. The fused multiply-adds are explicit (`llvm.fma`) and
the tiles are compiled without fast-math flags, which would let LLVM contract or reorder them
differently in tiles of different shapes (q4_m's results did differ with them).

The interleaved copy replaces the file's pages in memory: `group_rows` drops them from the
process after copying (`release_mapped_pages`), so a model is never resident twice.

Measurements: docs/kernels.md.

May import: numba, llvmlite, numpy, the CPU kernel modules `int_dot` (x's rounding),
`cpu_kernels`, `target`, `isa`, `santacpu.formats`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ...formats.blocks import FORMATS as BLOCK_FORMATS
from ...formats.blocks import QK, QuantizedWeight
from ...formats.safetensors_io import release_mapped_pages
from ...kernel_cache import track_kernel_sources
from .cpu_kernels import FASTMATH, f16_to_f32
from .int_dot import ACTIVATION_LEVELS, block_rounding
from .isa import VNNI256, VNNI512, for_isa
from .isa.llvm_ir import F32, I8, I16, I32, broadcast, declare, literal, load_vector, splat
from .target import TARGETS, CpuTarget, runnable_targets

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

# The formats with row groups, and their ids (the kernels' compile-time switch: blocks.BlockFormat).
FORMATS = ("q4_0", "q4_m", "q6_0", "q8_0")
Q4_0, Q4_M, Q6_0, Q8_0 = (BLOCK_FORMATS[name].format_id for name in ("q4_0", "q4_m", "q6_0", "q8_0"))
# The tiles' own id for q8_0 codes against x rounded to int8 (a kernel, not a block format).
Q8_0_INT8_X = 64
# Every tile kernel by name (tools/kernel_asm.py): the formats' own, and q8_0's with int8 x.
KERNEL_IDS = {**{name: BLOCK_FORMATS[name].format_id for name in FORMATS}, "q8_0-int8x": Q8_0_INT8_X}
VNNI_ISAS = (VNNI256, VNNI512)  # `vpdpbusd`: int8 x meets q8_0's codes 4 products a lane
GROUP_SIZES = (4, 8, 16)  # rows a group: 128-, 256- or 512-bit vectors of int32 lanes
_ROWS = {target.isa: target.rows_per_group for target in TARGETS}
_TILE_TOKENS = {(target.isa, BLOCK_FORMATS[qtype].format_id): target.widest_tile(qtype) for target in TARGETS for qtype in FORMATS}
_TILE_TOKENS.update({(target.isa, Q8_0_INT8_X): target.widest_tile("q8_0") for target in TARGETS})
# A one-token product streams the weight from memory: each block prefetches its cache lines
# this far ahead (the next groups' codes, in address order).
PREFETCH_BYTES = 4096
CHUNK_ROWS = 1024  # rows interleaved at a time at load (a multiple of every group size)
CODE_PARTS = {"q4_0": ("qs",), "q4_m": ("qs",), "q6_0": ("ql", "qh"), "q8_0": ("qs",)}  # interleaved by rows
PANEL_ROWS = 64  # rows a thread takes through all the tokens (they stay in L2)


def block_bytes(qtype: str, rows_per_group: int) -> int:
    """Code bytes of one block of a group: 4-bit 16 n, q6_0 24 n (nibbles, then two vectors of
    high bits), q8_0 32 n, for n rows a group."""
    return {"q8_0": 32, "q6_0": 24}.get(qtype, 16) * rows_per_group


@dataclass(frozen=True)
class RowGroupWeight:
    """A weight [R, C] as row groups of n = `rows_per_group` rows (module docstring), G = ceil(R /
    n) groups: `parts` = (codes uint8 [G, C/32 * block_bytes] (q8_0: int8), then q4_0, q6_0, q8_0:
    scales uint16 (fp16 bits) [G, C/32 * n]; q4_m: scale codes, minimum codes uint8 [G, C/32 *
    n], d, dmin float32 [n G]). `source`: the weight as loaded. q8_0 only: `int8_x` (its products
    round x to int8, not int16) and `word_bytes` (its values a row together in a lane: 2 or 4)."""

    source: QuantizedWeight
    parts: tuple[np.ndarray, ...]
    rows_per_group: int
    int8_x: bool = False
    word_bytes: int = 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.source.shape

    @property
    def qtype(self) -> str:
        return self.source.qtype

    @property
    def format_id(self) -> int:
        return BLOCK_FORMATS[self.qtype].format_id

    @property
    def kernel_id(self) -> int:
        """The tiles' literal for this weight: its format id, or Q8_0_INT8_X."""
        return Q8_0_INT8_X if self.int8_x else self.format_id

    @property
    def x_levels(self) -> int:
        """The integer range its products round x to per block (reference.round_activations)."""
        return 127 if self.int8_x else ACTIVATION_LEVELS[self.qtype]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


def q8_0_word_bytes(rows_per_group: int, int8_x: bool = False, isa: int | None = None) -> int:
    """Bytes of a row together in q8_0's interleave: 4 values a lane in 4-row groups (the tiles
    there split x into bytes for 4-value dot products) and for the VNNI tiles of int8 x
    (`vpdpbusd`), 2 in the others (int16 pairs)."""
    return 4 if rows_per_group == 4 or (int8_x and isa in VNNI_ISAS) else 2


def group_rows(weight: QuantizedWeight, rows_per_group: int, int8_x: bool = False, isa: int | None = None) -> RowGroupWeight:
    """`weight` (one of FORMATS) interleaved into row groups of `rows_per_group` (4, 8 or 16) rows;
    the pages of its file mapping are dropped from this process afterwards (they stay in the page
    cache). q8_0: `int8_x` for products that round x to int8, laid out for the tiles of `isa` (an
    instruction-set id)."""
    if weight.qtype not in FORMATS:
        raise ValueError(f"row groups hold {', '.join(FORMATS)} weights, not {weight.qtype}")
    if rows_per_group not in GROUP_SIZES:
        raise ValueError(f"row groups hold 4, 8 or 16 rows, not {rows_per_group}")
    if int8_x and weight.qtype != "q8_0":
        raise ValueError(f"int8 x is a choice for q8_0 weights only (the others always take it), not {weight.qtype}")
    n = rows_per_group
    word_bytes = q8_0_word_bytes(n, int8_x, isa)
    R, C = weight.shape
    n_groups, n_blocks = -(-R // n), C // QK
    codes = np.empty((n_groups, n_blocks * block_bytes(weight.qtype, n)), np.int8 if weight.qtype == "q8_0" else np.uint8)
    # A chunk of rows at a time, its source pages dropped right after: the file's pages and the
    # copy are never both resident for more than a chunk (a whole LM head would add ~100 MB to
    # the peak).
    code_names = CODE_PARTS[weight.qtype]
    for first in range(0, R, CHUNK_ROWS):
        last = min(first + CHUNK_ROWS, R)
        chunk = codes[first // n : -(-last // n)]
        sources = [weight.parts[name][first:last] for name in code_names]
        if weight.qtype == "q8_0":  # a row's pairs (4-row groups: quads) of values a word
            word = np.int32 if word_bytes == 4 else np.int16
            interleave_rows(_words(sources[0], word), chunk.view(word), 0, n)
        elif weight.qtype == "q6_0":
            interleave_six_bits(_words(sources[0], np.uint32), _words(sources[1], np.uint32), chunk.view(np.uint32), n)
        else:  # 4 code bytes (8 values) a uint32 word
            interleave_rows(_words(sources[0], np.uint32), chunk.view(np.uint32), 0x88888888 if weight.qtype == "q4_0" else 0, n)
        for source in sources:
            release_mapped_pages(source)
    if weight.qtype in ("q4_0", "q6_0", "q8_0"):
        per_block = [weight.parts["d"].view(np.uint16)]
    else:
        per_block = [weight.parts["sc"], weight.parts["mn"]]
    parts = [codes]
    for part in per_block:
        parts.append(np.empty((n_groups, n_blocks * n), part.dtype))
        interleave_rows(part, parts[-1], 0, n)
    if weight.qtype == "q4_m":
        for name in ("d", "dmin"):
            padded = np.zeros(n_groups * n, np.float32)
            padded[:R] = weight.parts[name][:, 0]
            parts.append(padded)
    for name, part in weight.parts.items():
        if name not in code_names:  # the codes' pages went chunk by chunk
            release_mapped_pages(part)
    return RowGroupWeight(weight, tuple(parts), n, int8_x, word_bytes)


def _words(part: np.ndarray, dtype) -> np.ndarray:
    """A part's rows [R, bytes] as words of `dtype` [R, bytes / size] (a view; a copy of a part
    whose rows are not contiguous)."""
    return np.ascontiguousarray(part).view(dtype)


@njit(parallel=True, cache=True)
def interleave_rows(words, grouped, padding, n):
    """words [R, W] -> grouped [G, W n]: word w of row n g + i at grouped[g, n w + i], so the
    group's n rows take turns word by word; rows past R: `padding`. Every layout in the module
    docstring is this at some word size: 4-bit codes as uint32 (4 bytes of a row a lane), q8_0's
    values as int16 (2 values a lane), per-block parts (scales, q4_m's codes) as themselves."""
    R, W = words.shape
    for g in prange(grouped.shape[0]):
        for i in range(n):
            r = n * g + i
            if r < R:
                for w in range(W):  # one row read in order, its words n apart in the group
                    grouped[g, n * w + i] = words[r, w]
            else:
                for w in range(W):
                    grouped[g, n * w + i] = padding


@njit(parallel=True, cache=True)
def interleave_six_bits(ql, qh, codes, n):
    """q6_0's ql [R, C/8] and qh [R, C/32] as uint32 words -> codes [G, C/32 * 6 n] as uint32
    words: per block, the low nibbles as 4-bit codes are placed (words 0..4n-1), then two vectors
    of high bits (n words for the values in low nibbles, then n for those in high nibbles): byte
    m of row i's word holds, in bits 2v..2v+1, the high 2 bits of the value that sits in byte m
    of the row's nibble word v; rows past R: 0.

    Value j's high bits are bits 2 (j // 8)..2 (j // 8) + 1 of qh's byte j % 8 of the block. The
    value in byte m of nibble word v is 4 v + m (low nibble) or 16 + 4 v + m (high one), so its
    bits come from byte m of the block's first qh word (v even) or second (v odd), bit pair v // 2
    (low nibble) or 2 + v // 2 (high one): masks and shifts that stay inside each byte."""
    R = ql.shape[0]
    n_blocks = qh.shape[1] // 2
    for g in prange(codes.shape[0]):
        for i in range(n):
            r = n * g + i
            for b in range(n_blocks):
                at = 6 * n * b + i
                if r >= R:
                    for k in range(6):
                        codes[g, at + n * k] = 0
                    continue
                for v in range(4):
                    codes[g, at + n * v] = ql[r, 4 * b + v]
                first, second = qh[r, 2 * b], qh[r, 2 * b + 1]  # the block's qh bytes 0-3, 4-7
                codes[g, at + 4 * n] = (
                    (first & 0x03030303) | ((second & 0x03030303) << 2) | ((first & 0x0C0C0C0C) << 2) | ((second & 0x0C0C0C0C) << 4)
                )
                codes[g, at + 5 * n] = (
                    ((first >> 4) & 0x03030303) | (((second >> 4) & 0x03030303) << 2) | ((first & 0xC0C0C0C0) >> 2) | (second & 0xC0C0C0C0)
                )


@njit(fastmath=FASTMATH, cache=True)
def round_natural(x, xq, xfix, xdx, first, last):
    """Tokens first..last-1 of x float32 [T, C] -> xq int8 [T, C] (natural order), xfix int32
    [T, C/32] (-8 x each block's sum of xq), xdx float32 [T, C/32] (the block scales)."""
    for t in range(first, last):
        for b in range(x.shape[1] // QK):
            scale, inverse = block_rounding(x, t, QK * b, 127)
            total = 0
            for j in range(QK * b, QK * b + QK):
                q = np.int8(np.rint(x[t, j] * inverse))
                xq[t, j] = q
                total += np.int32(q)
            xfix[t, b] = -8 * total
            xdx[t, b] = scale


@njit(fastmath=FASTMATH, cache=True)
def round_natural_words(x, xq, xdx, first, last, levels):
    """As round_natural for q8_0: xq int16 [T, C] (max |x| -> levels: 32767, int_dot's rounding
    for q8_0, or 127 for int8 x on the tiles without `vpdpbusd`)."""
    for t in range(first, last):
        for b in range(x.shape[1] // QK):
            scale, inverse = block_rounding(x, t, QK * b, levels)
            for j in range(QK * b, QK * b + QK):
                xq[t, j] = np.int16(np.rint(x[t, j] * inverse))
            xdx[t, b] = scale


def takes_int16_x(fmt: int, isa: int) -> bool:
    """Whether the tiles of a kernel id and an instruction set take x as int16 (q8_0; its int8 x
    where there is no `vpdpbusd`: int8 values in the int16 tiles)."""
    return fmt == Q8_0 or (fmt == Q8_0_INT8_X and isa not in VNNI_ISAS)


def _round(fmt, isa, x, first, last, xq, xfix, xdx):
    """Tokens first..last-1 of x rounded for a row-group weight's kernel (round_natural, or
    round_natural_words where the tiles take int16 x, whose xfix stays unused); fmt and isa:
    literal ids."""


@overload(_round, prefer_literal=True)
def _round_impl(fmt, isa, x, first, last, xq, xfix, xdx):
    if literal(fmt) is None or literal(isa) is None:
        return None
    if takes_int16_x(literal(fmt), literal(isa)):
        levels = 127 if literal(fmt) == Q8_0_INT8_X else ACTIVATION_LEVELS["q8_0"]
        return lambda fmt, isa, x, first, last, xq, xfix, xdx: round_natural_words(x, xq, xdx, first, last, levels)
    return lambda fmt, isa, x, first, last, xq, xfix, xdx: round_natural(x, xq, xfix, xdx, first, last)


def _x_type(fmt, isa):
    """The integer type a row-group weight's kernel rounds x to (literal ids)."""


@overload(_x_type, prefer_literal=True)
def _x_type_impl(fmt, isa):
    if literal(fmt) is None or literal(isa) is None:
        return None
    if takes_int16_x(literal(fmt), literal(isa)):
        return lambda fmt, isa: np.int16
    return lambda fmt, isa: np.int8


def _group_tile_codegen(fmt, n_tokens, isa):
    """Codegen of _group_tile for a format id, a literal number of tokens and an instruction set
    (`isa` ids: its module gives the integer products)."""
    minimums = fmt == Q4_M
    words = takes_int16_x(fmt, isa)  # int8 codes widened to int16 against x as int16
    offset_bytes = fmt == Q8_0_INT8_X and not words  # codes + 128 against int8 x (`vpdpbusd`)
    six_bits = fmt == Q6_0
    products = for_isa(isa)
    n = _ROWS[isa]  # rows a group, one int32 lane each
    group_bytes = block_bytes({Q8_0: "q8_0", Q8_0_INT8_X: "q8_0", Q6_0: "q6_0"}.get(fmt, "q4_0"), n)

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
        lane = lambda v: ir.Constant(I32, v)  # noqa: E731
        n_blocks = cgutils.unpack_tuple(builder, xdx.shape, 2)[1]
        x_cols = cgutils.unpack_tuple(builder, xq.shape, 2)[1]
        n_rows = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        vec8, vec32, vecf = (ir.VectorType(t, k) for t, k in ((I8, 4 * n), (I32, n), (F32, n)))
        fma = declare(builder, f"llvm.fma.v{n}f32", vecf, vecf, vecf, vecf)
        prefetch = declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), I8.as_pointer(), I32, I32, I32)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vecf, None)) for _ in range(n_tokens)]
        min_accs = [cgutils.alloca_once_value(builder, ir.Constant(vecf, None)) for _ in range(n_tokens)] if minimums else []
        group_codes = builder.mul(group, builder.mul(n_blocks, const(group_bytes)))
        group_blocks = builder.mul(group, builder.mul(n_blocks, const(n)))
        x_rows = [builder.mul(builder.add(token, const(j)), x_cols) for j in range(n_tokens)]
        block_rows = [builder.mul(builder.add(token, const(j)), n_blocks) for j in range(n_tokens)]

        class TokenX:
            """One token's rounded x in the current block (from flat index `at` of xq)."""

            def __init__(self, at):
                self.at = at

            def word(self, offset):
                """4 int8 (q8_0: 2 int16) values from block offset `offset`, in every int32 lane."""
                address = builder.gep(xq.data, [builder.add(self.at, const(offset))])
                return broadcast(builder, builder.load(builder.bitcast(address, I32.as_pointer()), align=1), n)

            def quad(self, offset):
                """16 int8 (q8_0: 8 int16) values from block offset `offset`, as <4 x i32>."""
                return load_vector(builder, xq.data, builder.add(self.at, const(offset)), I32, 4)

            def pair(self, offset):
                """8 int8 values from block offset `offset`, as <2 x i32>."""
                return load_vector(builder, xq.data, builder.add(self.at, const(offset)), I32, 2)

        def per_block(part, at):
            """The group's n values of a per-block part at block offset `at`, as <n x float>."""
            if part is scales and not minimums:  # fp16 bits
                raw = load_vector(builder, part.data, at, I16, n)
                return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), n)), vecf)
            return builder.uitofp(load_vector(builder, part.data, at, I8, n), vecf)

        def x_fix(j, b):
            """-8 x the sum of token j's rounded x in block b (i32)."""
            return builder.load(builder.gep(xfix.data, [builder.add(block_rows[j], b)]))

        def offset_start(j, b):
            """Where token j's block sums start: the codes' offset times x's block sum, in every
            lane (q4_0's offset 8: xfix; q6_0's 32: 4 xfix; q4_m has minimums instead)."""
            fix = x_fix(j, b)
            return broadcast(builder, builder.shl(fix, ir.Constant(I32, 2)) if six_bits else fix, n)

        def accumulate(j, sums, b, weight_scales, weight_minimums):
            """Token j's block sums <n x i32> (their offsets included) into its accumulators: one
            fused multiply-add by the weight's and x's block scales (the same operations in any
            tile)."""
            x_block = builder.add(block_rows[j], b)
            x_scale = builder.load(builder.gep(xdx.data, [x_block]))
            if minimums:  # the minimums meet x's block sum (times -8): exact ints, one scale
                x_sum = broadcast(builder, builder.fmul(builder.sitofp(x_fix(j, b), F32), x_scale), n)
                builder.store(builder.call(fma, [weight_minimums, x_sum, builder.load(min_accs[j])]), min_accs[j])
            scale = builder.fmul(weight_scales, broadcast(builder, x_scale, n))
            total = builder.call(fma, [builder.sitofp(sums, vecf), scale, builder.load(accs[j])])
            builder.store(total, accs[j])

        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            code_at = builder.add(group_codes, builder.mul(b, const(group_bytes)))
            if n_tokens == 1:  # decode streams the codes: their lines PREFETCH_BYTES ahead
                for line in range(group_bytes // 64):
                    ahead = builder.gep(codes.data, [builder.add(code_at, const(PREFETCH_BYTES + 64 * line))])
                    builder.call(prefetch, [builder.bitcast(ahead, I8.as_pointer()), lane(0), lane(3), lane(1)])
            block_at = builder.add(group_blocks, builder.mul(b, const(n)))
            weight_scales = per_block(scales, block_at)
            weight_minimums = per_block(parts[2], block_at) if minimums else None
            tokens = [TokenX(builder.add(x_rows[j], builder.mul(b, const(QK)))) for j in range(n_tokens)]
            if words:  # the block's codes from byte `offset` on (<count x i8>; layout above)
                load = lambda offset, count: load_vector(builder, codes.data, builder.add(code_at, const(offset)), I8, count)  # noqa: E731
                token_sums = products.word_block_sums(builder, isa, n, load, tokens)
            elif offset_bytes:  # 8 vectors of values 4k..4k+3 a row, + 128; each sum starts at -128 sum(x)
                flip = splat(I8, 4 * n, -128)
                unsigned = [
                    builder.xor(load_vector(builder, codes.data, builder.add(code_at, const(4 * n * k)), I8, 4 * n), flip) for k in range(8)
                ]
                starts = [broadcast(builder, builder.shl(x_fix(j, b), ir.Constant(I32, 4)), n) for j in range(n_tokens)]
                for j, sums in enumerate(products.offset_byte_sums(builder, isa, unsigned, tokens, starts)):
                    accumulate(j, sums, b, weight_scales, weight_minimums)
            else:
                packed = [load_vector(builder, codes.data, builder.add(code_at, const(4 * n * v)), I8, 4 * n) for v in range(4)]
                lows = [builder.and_(p, splat(I8, 4 * n, 0x0F)) for p in packed]
                highs = [builder.lshr(p, splat(I8, 4 * n, 4)) for p in packed]
                if six_bits:  # bits 2v..2v+1 of each high-bits byte to bits 4-5, per 16-bit lane
                    for k, codes_v in enumerate((lows, highs)):
                        top = load_vector(builder, codes.data, builder.add(code_at, const(16 * n + 4 * n * k)), I16, 2 * n)
                        for v in range(4):
                            moved = top if v == 2 else (
                                builder.shl(top, splat(I16, 2 * n, 4 - 2 * v)) if v < 2 else builder.lshr(top, splat(I16, 2 * n, 2))
                            )
                            bits = builder.and_(builder.bitcast(moved, vec8), splat(I8, 4 * n, 0x30))
                            codes_v[v] = builder.or_(codes_v[v], bits)
                # a few tokens at a time (one; i8mm: a pair), each accumulated right after its
                # sums, so that few sums are live at once
                step = products.tokens_per_call(isa)
                for j0 in range(0, n_tokens, step):
                    chosen = range(j0, min(j0 + step, n_tokens))
                    starts = None if minimums else [offset_start(j, b) for j in chosen]
                    chunk = products.nibble_sums(builder, isa, lows, highs, [tokens[j] for j in chosen], six_bits, starts)
                    for j, sums in enumerate(chunk, j0):
                        accumulate(j, sums, b, weight_scales, weight_minimums)
            if words:
                for j in range(n_tokens):
                    accumulate(j, token_sums[j], b, weight_scales, weight_minimums)
        first_row = builder.mul(group, const(n))
        if minimums:  # per-row super-scales
            d = load_vector(builder, parts[3].data, first_row, F32, n)
            dmin = builder.fmul(load_vector(builder, parts[4].data, first_row, F32, n), splat(F32, n, 0.125))
        whole = builder.icmp_signed("<=", builder.add(first_row, const(n)), n_rows)
        for j in range(n_tokens):
            total = builder.load(accs[j])
            if minimums:
                total = builder.call(fma, [dmin, builder.load(min_accs[j]), builder.fmul(d, total)])
            out_at = builder.add(builder.mul(builder.add(token, const(j)), n_rows), first_row)
            with builder.if_else(whole, likely=True) as (all_rows, some_rows):
                with all_rows:
                    value = builder.fadd(total, load_vector(builder, bias.data, first_row, F32, n))
                    address = builder.bitcast(builder.gep(out.data, [out_at]), vecf.as_pointer())
                    builder.store(value, address, align=4)
                with some_rows:  # the last group of a weight whose rows are not a multiple of n
                    for i in range(n):
                        with builder.if_then(builder.icmp_signed("<", builder.add(first_row, const(i)), n_rows)):
                            bias_i = builder.load(builder.gep(bias.data, [builder.add(first_row, const(i))]))
                            value = builder.fadd(builder.extract_element(total, lane(i)), bias_i)
                            builder.store(value, builder.gep(out.data, [builder.add(out_at, const(i))]))
        return context.get_dummy_value()

    return codegen


@intrinsic
def _group_tile(typingctx, parts, xq, xfix, xdx, bias, group, token, out, n_tokens, fmt, isa):
    """out[token + j, n group + i] = row n group + i . token token + j's rounded x + bias, for the
    group's n rows (those < R) and j < n_tokens, with format `fmt` and the instructions of `isa`
    (literal ints; n: the isa's rows a group). Arrays as matmul_groups has them."""
    if any(literal(v) is None for v in (n_tokens, fmt, isa)):
        return None
    sig = types.none(parts, xq, xfix, xdx, bias, types.intp, types.intp, out, n_tokens, fmt, isa)
    return sig, _group_tile_codegen(fmt.literal_value, n_tokens.literal_value, isa.literal_value)


def _tokens_tile(parts, xq, xfix, xdx, bias, group, token, out, n, fmt, isa):
    """_group_tile for n tokens from `token` on (1 up to the literal isa's widest tile for the
    format, 4 or 8), as tiles of 8, 4, 2 and 1 tokens: a run-time n to the literals it needs, with
    few tile shapes to compile (a token's result is the same in any tile)."""


@overload(_tokens_tile, prefer_literal=True, inline="always")
def _tokens_tile_impl(parts, xq, xfix, xdx, bias, group, token, out, n, fmt, isa):
    if literal(isa) is None or literal(fmt) is None:
        return None
    widest = _TILE_TOKENS[literal(isa), literal(fmt)]

    def tiles(parts, xq, xfix, xdx, bias, group, token, out, n, fmt, isa):
        if widest == 8 and n & 8:
            _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 8, fmt, isa)
            token += 8
        if n & 4:
            _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 4, fmt, isa)
            token += 4
        if n & 2:
            _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 2, fmt, isa)
            token += 2
        if n & 1:
            _group_tile(parts, xq, xfix, xdx, bias, group, token, out, 1, fmt, isa)

    return tiles


def _tile_tokens(isa, fmt):
    """The widest token tile of a literal instruction-set id for a literal format id."""


@overload(_tile_tokens, prefer_literal=True)
def _tile_tokens_impl(isa, fmt):
    if literal(isa) is None or literal(fmt) is None:
        return None
    widest = _TILE_TOKENS[literal(isa), literal(fmt)]
    return lambda isa, fmt: widest


@njit(parallel=True, cache=True)  # no fast-math flags on the tiles: their float ops stay as written
def matmul_groups(parts, x, bias, out, fmt, isa):
    """out [T, R] = x [T, C] @ W.T + bias [R] for W as row groups (its parts tuple), float32;
    fmt: its format id, isa: an instruction-set id (literal ints: compiled per value)."""
    tile_tokens = _tile_tokens(isa, fmt)
    T, C = x.shape
    n = parts[1].shape[1] // (C // QK)  # rows a group: the per-block part holds n values a block
    xq = np.empty((T, C), _x_type(fmt, isa))
    xfix = np.empty((T, C // QK), np.int32)
    xdx = np.empty((T, C // QK), np.float32)
    if T < 8:
        _round(fmt, isa, x, 0, T, xq, xfix, xdx)
    else:
        for t in prange(T):
            _round(fmt, isa, x, t, t + 1, xq, xfix, xdx)
    G = parts[0].shape[0]
    if T == 1:
        for g in prange(G):
            _group_tile(parts, xq, xfix, xdx, bias, g, 0, out, 1, fmt, isa)
    else:
        panel_groups = PANEL_ROWS // n
        for panel in prange((G + panel_groups - 1) // panel_groups):
            for token in range(0, T, tile_tokens):  # these tokens' x in L1, the panel's codes in L2
                k = min(tile_tokens, T - token)
                for g in range(panel * panel_groups, min((panel + 1) * panel_groups, G)):
                    _tokens_tile(parts, xq, xfix, xdx, bias, g, token, out, k, fmt, isa)


@njit(cache=True, inline="always")
def _nibble_values(parts, g, i, b, values, n, scale, shift, offset):
    """values = scale (code - shift) - offset for block b of row i of group g (4-bit codes)."""
    for v in range(4):
        for m in range(4):
            byte = parts[0][g, 16 * n * b + 4 * n * v + 4 * i + m]
            values[4 * v + m] = scale * (np.float32(byte & 15) - shift) - offset
            values[16 + 4 * v + m] = scale * (np.float32(byte >> 4) - shift) - offset


def _block_values(parts, g, i, b, values, n, w, fmt):
    """values float32 [32] = block b of row i of group g, from a row-group weight's parts (n rows
    a group; w: q8_0's bytes of a row together; fmt: a literal format id)."""


@overload(_block_values, prefer_literal=True)
def _block_values_impl(parts, g, i, b, values, n, w, fmt):
    fmt = literal(fmt)
    if fmt is None:
        return None

    def q8_0(parts, g, i, b, values, n, w, fmt):
        d = f16_to_f32(parts[1][g, n * b + i])
        for p in range(QK // w):
            for k in range(w):
                values[w * p + k] = d * np.float32(parts[0][g, 32 * n * b + w * n * p + w * i + k])

    def q6_0(parts, g, i, b, values, n, w, fmt):
        d, codes, at = f16_to_f32(parts[1][g, n * b + i]), parts[0], 24 * n * b
        for v in range(4):
            for m in range(4):
                byte = np.int32(codes[g, at + 4 * n * v + 4 * i + m])
                low_top = (np.int32(codes[g, at + 16 * n + 4 * i + m]) >> (2 * v)) & 3
                high_top = (np.int32(codes[g, at + 20 * n + 4 * i + m]) >> (2 * v)) & 3
                values[4 * v + m] = d * (np.float32((byte & 15) + 16 * low_top) - np.float32(32.0))
                values[16 + 4 * v + m] = d * (np.float32((byte >> 4) + 16 * high_top) - np.float32(32.0))

    def q4_0(parts, g, i, b, values, n, w, fmt):  # d (q - 8)
        _nibble_values(parts, g, i, b, values, n, f16_to_f32(parts[1][g, n * b + i]), np.float32(8.0), np.float32(0.0))

    def q4_m(parts, g, i, b, values, n, w, fmt):  # (d sc) q - dmin mn
        at = n * b + i
        scale = parts[3][n * g + i] * np.float32(parts[1][g, at])
        _nibble_values(parts, g, i, b, values, n, scale, np.float32(0.0), parts[4][n * g + i] * np.float32(parts[2][g, at]))

    return {Q8_0: q8_0, Q6_0: q6_0, Q4_0: q4_0, Q4_M: q4_m}[fmt]


@njit(cache=True)
def _dequantize_group_rows(parts, rows, out, n, w, fmt):
    for r in range(rows.shape[0]):
        g, i = rows[r] // n, rows[r] % n
        for b in range(out.shape[1] // QK):
            _block_values(parts, g, i, b, out[r, QK * b : QK * b + QK], n, w, fmt)


def dequantize_rows(weight: RowGroupWeight, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (ints < R) of a RowGroupWeight as float32 [len(rows), C], the values its
    format's `dequantize` gives (an embedding lookup from the grouped LM head)."""
    R, C = weight.shape
    rows = np.asarray(rows, np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= R):
        raise ValueError(f"rows of a [{R}, {C}] weight: got {rows.min()}..{rows.max()}")
    out = np.empty((len(rows), C), np.float32)
    _row_reader(weight.format_id)(weight.parts, rows, out, weight.rows_per_group, weight.word_bytes)
    return out


# Entry points with the literal arguments bound as constants: a plain int passed from Python
# would make Numba retry its typing on every call (~50 ms) before taking the literal version.


@functools.cache
def _product_kernel(fmt: int, isa: int):
    @njit(cache=True)
    def product(parts, x, bias, out):
        matmul_groups(parts, x, bias, out, fmt, isa)

    return product


@functools.cache
def _row_reader(fmt: int):
    @njit(cache=True)
    def read(parts, rows, out, n, w):
        _dequantize_group_rows(parts, rows, out, n, w, fmt)

    return read


def matmul(weight: RowGroupWeight, x: np.ndarray, bias: np.ndarray, out: np.ndarray, target: CpuTarget | None = None) -> None:
    """out [T, R] = x [T, C] @ W.T + bias [R] (float32, C-contiguous) for a RowGroupWeight, with
    the tiles of `target` (default: the best this CPU runs for the weight's group size)."""
    R, C = weight.shape
    T = x.shape[0] if x.ndim == 2 else -1
    # The kernel does no bounds checks: a wrong shape here would read or write out of bounds.
    if x.shape != (T, C) or bias.shape != (R,) or out.shape != (T, R) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"row-group matmul [{R}, {C}]: got x {x.shape}, bias {bias.shape}, out {out.shape}")
    fitting = [t for t in runnable_targets() if t.rows_per_group == weight.rows_per_group]
    if target is None and fitting:
        target = fitting[0]
    # Code for an instruction set the CPU lacks aborts LLVM (or dies of SIGILL): refused here.
    if target not in fitting:
        names = ", ".join(t.name for t in fitting) or "none"
        raise ValueError(f"row-group tiles: {getattr(target, 'name', target)} cannot run {weight.rows_per_group}-row groups on this CPU (runnable: {names})")
    if weight.qtype == "q8_0" and weight.word_bytes != q8_0_word_bytes(weight.rows_per_group, weight.int8_x, target.isa):
        raise ValueError(f"row-group tiles: this q8_0 weight is laid out for another instruction set's tiles than {target.name}'s")
    _product_kernel(weight.kernel_id, target.isa)(
        weight.parts, np.ascontiguousarray(x, np.float32), np.ascontiguousarray(bias, np.float32), out
    )
