"""x86 building blocks of the row-group tiles: AVX2, AVX-VNNI (VNNI on 256-bit vectors) and
AVX-512 VNNI (512-bit), n int32 lanes, one per row of a group (n = 8 or 16).

- VNNI: `vpdpbusd` adds 4 (unsigned code x signed x) products into each lane, `vpdpwssd` 2
  (int16 x int16) products; a block's nibbles as two chains of 4 (low and high nibbles), half
  the latency of one chain of 8.
- AVX2: `vpmaddubsw` adds pair products as int16; a block's 8 of them (4-bit codes: at most 8 x 2
  x 15 x 127 = 30480) are added as int16 and widened by one `vpmaddwd`; q6_0's pair products reach
  2 x 63 x 127, so every two are widened; q8_0's words: `vpmaddwd` and an add.

All compute the same exact int32 sums as `portable` and `arm64`.

May import: llvmlite, `isa.llvm_ir`, `isa` (the ids).
"""

from __future__ import annotations

from llvmlite import ir

from . import VNNI256, VNNI512
from .llvm_ir import I8, I16, I32, declare, splat


def _vnni(isa: int) -> bool:
    return isa in (VNNI256, VNNI512)


def word_dot(builder, isa: int, sums, words, xs):
    """sums <n x i32> + each lane's 2 products of `words` <2n x i16> with `xs` (<n x i32>: a pair
    of int16 x values, the same in every lane)."""
    n = sums.type.count
    vec16, vec32 = ir.VectorType(I16, 2 * n), ir.VectorType(I32, n)
    if _vnni(isa):
        vpdpwssd = declare(builder, f"llvm.x86.avx512.vpdpwssd.{32 * n}", vec32, vec32, vec32, vec32)
        return builder.call(vpdpwssd, [sums, builder.bitcast(words, vec32), xs])
    pmaddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", vec32, vec16, vec16)
    return builder.add(sums, builder.call(pmaddwd, [words, builder.bitcast(xs, vec16)]))


def nibble_sums(builder, isa: int, lows, highs, tokens, six_bits: bool):
    """Each token's block sums <n x i32> (a list, one per token of `tokens`): lane i holds row i's
    32 codes (lows[v]: values 4v..4v+3 of each row, <4n x i8>; highs[v]: values 16+4v..) times the
    token's rounded x. `tokens[j].word(offset)` broadcasts x's 4 int8 values at block offset
    `offset` to every lane (<n x i32>)."""
    n = lows[0].type.count // 4
    vec8, vec16, vec32 = ir.VectorType(I8, 4 * n), ir.VectorType(I16, 2 * n), ir.VectorType(I32, n)
    if _vnni(isa):
        vpdpbusd = declare(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", vec32, vec32, vec32, vec32)
        result = []
        for token in tokens:
            low_sums, high_sums = ir.Constant(vec32, None), ir.Constant(vec32, None)
            for v in range(4):
                low_sums = builder.call(vpdpbusd, [low_sums, builder.bitcast(lows[v], vec32), token.word(4 * v)])
                high_sums = builder.call(vpdpbusd, [high_sums, builder.bitcast(highs[v], vec32), token.word(16 + 4 * v)])
            result.append(builder.add(low_sums, high_sums))
        return result
    pmaddubsw = declare(builder, "llvm.x86.avx2.pmadd.ub.sw", vec16, vec8, vec8)
    pmaddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", vec32, vec16, vec16)
    ones = splat(I16, 2 * n, 1)
    result = []
    for token in tokens:

        def pairs(codes, offset):
            return builder.call(pmaddubsw, [codes, builder.bitcast(token.word(offset), vec8)])

        if six_bits:  # pair products up to 2 x 63 x 127: widened every 2 of them
            sums = ir.Constant(vec32, None)
            for v in range(4):
                both = builder.add(pairs(lows[v], 4 * v), pairs(highs[v], 16 + 4 * v))
                sums = builder.add(sums, builder.call(pmaddwd, [both, ones]))
        else:  # 8 pair sums of at most 2 x 15 x 127 each, added as int16
            words = ir.Constant(vec16, None)
            for v in range(4):
                words = builder.add(words, pairs(lows[v], 4 * v))
                words = builder.add(words, pairs(highs[v], 16 + 4 * v))
            sums = builder.call(pmaddwd, [words, ones])
        result.append(sums)
    return result
