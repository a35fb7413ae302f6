"""ARM64 NEON building blocks of the row-group tiles: 4 int32 lanes (128-bit vectors), one per
row of a group of 4.

- dotprod (`NEON_DOT`: Apple M1 and later, Graviton 2+, Snapdragon X): `sdot` adds 4 (int8 x
  int8) products into each lane; a block's nibbles as two chains of 4, as on VNNI. Codes are at
  most 63, so the signed product is the unsigned one.
- i8mm (`NEON_I8MM`: Apple M2 and later): `smmla` multiplies a 2 x 8 int8 matrix by the transpose
  of another into a 2 x 2 int32 block, so two rows meet two tokens' 8 values in one instruction
  (twice sdot's products). The rows' codes are zipped into row pairs in registers, two tokens' x
  loaded side by side, and the 2 x 2 blocks unzipped into each token's row lanes. A token without
  a partner (odd counts) goes through `sdot`: both give the same exact int32 sums.
- q8_0's int16 x: NEON has no int16 dot product, so x is split into its high and low bytes and
  each meets the codes through `sdot` (`word_block_sums`); with i8mm the low bytes, unsigned,
  through `sudot`.
- x's 4-byte words meet the codes through the by-element form of `sdot` (`sdot v.4s, v.16b,
  v.4b[k]`): x's 16 values are loaded once and LLVM folds the lane broadcast into the sdot.

Compiling these intrinsics for a CPU without the extension aborts LLVM, so `target.py` offers
these instruction sets only where Numba's target features have them.

May import: llvmlite, `isa.llvm_ir`, `isa` (the ids).
"""

from __future__ import annotations

from llvmlite import ir

from . import NEON_I8MM
from .llvm_ir import I8, I32, byte_split_sums, declare, with_starts

LANES = 4  # int32 lanes of a 128-bit vector: rows a group
_VEC8, _VEC32 = ir.VectorType(I8, 16), ir.VectorType(I32, LANES)


def word_block_sums(builder, isa: int, n: int, load, tokens):
    """q8_0: each token's block sums <4 x i32>, x split into bytes for `sdot` by element
    (`llvm_ir.byte_split_sums`); with i8mm, x's low bytes unsigned through `sudot` by element."""
    unsigned = (lambda sums, codes, xs: _sudot(builder, sums, codes, xs)) if isa == NEON_I8MM else None
    return byte_split_sums(builder, load, tokens, lambda sums, codes, xs: _sdot(builder, sums, codes, xs), unsigned)


def _sdot(builder, sums, codes, xs):
    sdot = declare(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", _VEC32, _VEC32, _VEC8, _VEC8)
    return builder.call(sdot, [sums, codes, builder.bitcast(xs, _VEC8)])


def _sudot(builder, sums, codes, xs):
    """sums + each lane's 4 products of signed `codes` with the unsigned bytes of `xs` (i8mm's
    `usdot`, its operands swapped: LLVM picks `sudot` by element for a lane broadcast)."""
    usdot = declare(builder, "llvm.aarch64.neon.usdot.v4i32.v16i8", _VEC32, _VEC32, _VEC8, _VEC8)
    return builder.call(usdot, [sums, builder.bitcast(xs, _VEC8), codes])


def _smmla(builder, sums, rows, tokens):
    smmla = declare(builder, "llvm.aarch64.neon.smmla.v4i32.v16i8", _VEC32, _VEC32, _VEC8, _VEC8)
    return builder.call(smmla, [sums, rows, tokens])


def _shuffle(builder, a, b, picks):
    """<len(picks) x T> from the lanes of a then b (a, b of the same type)."""
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, len(picks)), picks))


def _dot_sums(builder, lows, highs, token):
    x_low, x_high = token.quad(0), token.quad(16)  # x's values 0..15 and 16..31 as <4 x i32>
    low_sums, high_sums = ir.Constant(_VEC32, None), ir.Constant(_VEC32, None)
    for v in range(4):
        low_sums = _sdot(builder, low_sums, lows[v], _shuffle(builder, x_low, x_low, [v] * 4))
        high_sums = _sdot(builder, high_sums, highs[v], _shuffle(builder, x_high, x_high, [v] * 4))
    return builder.add(low_sums, high_sums)


def _pair_sums(builder, lows, highs, first, second):
    """Two tokens' block sums <4 x i32> through smmla."""
    row_pairs = []  # per 8 values (codes vectors v, v + 1): rows 0-1 and rows 2-3, 8 bytes a row
    for codes in (lows, highs):
        for v in (0, 2):
            a, b = builder.bitcast(codes[v], _VEC32), builder.bitcast(codes[v + 1], _VEC32)
            row_pairs.append((builder.bitcast(_shuffle(builder, a, b, [0, 4, 1, 5]), _VEC8),
                              builder.bitcast(_shuffle(builder, a, b, [2, 6, 3, 7]), _VEC8)))
    offsets = (0, 8, 16, 24)  # the x values of each row_pairs entry: lows 0..7, 8..15, highs 16.., 24..
    blocks = [ir.Constant(_VEC32, None), ir.Constant(_VEC32, None)]  # rows 0-1, 2-3 x the 2 tokens
    for (rows01, rows23), offset in zip(row_pairs, offsets):
        x = builder.bitcast(_shuffle(builder, first.pair(offset), second.pair(offset), [0, 1, 2, 3]), _VEC8)
        blocks[0] = _smmla(builder, blocks[0], rows01, x)
        blocks[1] = _smmla(builder, blocks[1], rows23, x)
    # blocks: [r0 t0, r0 t1, r1 t0, r1 t1] and the same for rows 2-3 -> each token's 4 rows
    return _shuffle(builder, blocks[0], blocks[1], [0, 2, 4, 6]), _shuffle(builder, blocks[0], blocks[1], [1, 3, 5, 7])


def tokens_per_call(isa: int) -> int:
    """Tokens one nibble_sums call should take (the tile accumulates each call's sums at once)."""
    return 2 if isa == NEON_I8MM else 1


def nibble_sums(builder, isa: int, lows, highs, tokens, six_bits: bool, starts=None):
    """Each token's block sums <4 x i32> plus its start (as `x86.nibble_sums`); with i8mm, tokens
    are taken in pairs (`tokens[j].pair(offset)`: x's 8 int8 values at block offset `offset` as
    <2 x i32>)."""
    result = []
    j = 0
    while j < len(tokens):
        if isa == NEON_I8MM and j + 1 < len(tokens):
            result.extend(_pair_sums(builder, lows, highs, tokens[j], tokens[j + 1]))
            j += 2
        else:
            result.append(_dot_sums(builder, lows, highs, tokens[j]))
            j += 1
    return with_starts(builder, result, starts)
