"""x86 building blocks of the integer kernels: AVX2, AVX-VNNI (VNNI on 256-bit vectors) and
AVX-512 VNNI (512-bit). For the row-group tiles (`repack.py`): n int32 lanes, one per row of
a group (n = 8 or 16).

- VNNI: `vpdpbusd` adds 4 (unsigned code x signed x) products into each lane, `vpdpwssd` 2
  (int16 x int16) products; a block's 8 nibble vectors as one chain that starts from the
  token's offset (a prompt tile's tokens are independent chains; two chains per token, added
  after, cost 2 instructions a token more and spilled registers in the 8-token tile); q8_0's
  codes against int8 x the same way, each code + 128 (`offset_byte_sums`, VNNI only).
- AVX2: `vpmaddubsw` adds pair products as int16; a block's 8 of them (4-bit codes: at most 8 x 2
  x 15 x 127 = 30480) are added as int16 and widened by one `vpmaddwd`; q6_0's pair products reach
  2 x 63 x 127, so every two are widened; q8_0's words: `vpmaddwd` and an add.

All compute the same exact int32 sums as `portable` and `arm64`.

May import: llvmlite, `isa.llvm_ir`, `isa` (the ids).
"""

from __future__ import annotations

from llvmlite import ir

from . import VNNI256, VNNI512
from .llvm_ir import I8, I16, I32, declare, splat, with_starts


def _vnni(isa: int) -> bool:
    return isa in (VNNI256, VNNI512)


def word_block_sums(builder, isa: int, n: int, load, tokens):
    """q8_0 (groups of n rows interleaved 2 values a row, `repack.q8_0_word_bytes`): each token's
    block sums <n x i32>, a piece at a time: piece p (`load(2 n p, 2 n)`: values 2p and 2p + 1 of
    each row) widened to int16, its 2 products a lane by `vpmaddwd` or `vpdpwssd` against the
    token's 2 int16 values in every lane (`token.word(2 p)`). One piece is live at a time, the
    tokens' sums beside it: 16 widened pieces would not fit AVX2's 16 registers."""
    vnni = _vnni(isa)
    vec16 = ir.VectorType(I16, 2 * n)
    sums = [ir.Constant(ir.VectorType(I32, n), None)] * len(tokens)
    for p in range(16):
        wide = builder.sext(load(2 * n * p, 2 * n), vec16)
        sums = [lane_word_dot(builder, vnni, total, wide, builder.bitcast(token.word(2 * p), vec16)) for total, token in zip(sums, tokens)]
    return sums


def tokens_per_call(isa: int) -> int:
    """Tokens one nibble_sums call should take (the tile accumulates each call's sums at once)."""
    return 1


def nibble_sums(builder, isa: int, lows, highs, tokens, six_bits: bool, starts=None):
    """Each token's block sums <n x i32> (a list, one per token of `tokens`): lane i holds row i's
    32 codes (lows[v]: values 4v..4v+3 of each row, <4n x i8>; highs[v]: values 16+4v..) times the
    token's rounded x, plus the token's `starts[j]` (<n x i32>, e.g. the codes' offset times x's
    sum; None: 0). `tokens[j].word(offset)` broadcasts x's 4 int8 values at block offset `offset`
    to every lane (<n x i32>)."""
    n = lows[0].type.count // 4
    vec8, vec16, vec32 = ir.VectorType(I8, 4 * n), ir.VectorType(I16, 2 * n), ir.VectorType(I32, n)
    if _vnni(isa):
        pieces = [piece for v in range(4) for piece in ((lows[v], 4 * v), (highs[v], 16 + 4 * v))]
        return _vpdpbusd_chains(builder, pieces, tokens, starts)
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
    return with_starts(builder, result, starts)


def lane_word_dot(builder, vnni: bool, acc, words, x_words):
    """acc <n x i32> + per-lane sums of 2 products of int16 vectors <2n x i16>."""
    n = acc.type.count
    vec16, vec32 = ir.VectorType(I16, 2 * n), ir.VectorType(I32, n)
    if vnni:
        vpdpwssd = declare(builder, f"llvm.x86.avx512.vpdpwssd.{32 * n}", vec32, vec32, vec32, vec32)
        return builder.call(vpdpwssd, [acc, builder.bitcast(words, vec32), builder.bitcast(x_words, vec32)])
    return builder.add(acc, builder.call(declare(builder, "llvm.x86.avx2.pmadd.wd", vec32, vec16, vec16), [words, x_words]))


def offset_byte_sums(builder, isa: int, codes, tokens, starts):
    """VNNI only: q8_0's codes against int8 x, each token's block sums <n x i32>: `codes[k]`
    (<4n x i8>) holds values 4k..4k+3 of each row plus 128 (unsigned, as `vpdpbusd` takes its
    first operand), so each token's chain of 8 `vpdpbusd` starts from `starts[j]` = -128 x the
    token's block sum of x (at most 32 x 255 x 127 in a lane: exact)."""
    return _vpdpbusd_chains(builder, [(codes[k], 4 * k) for k in range(8)], tokens, starts)


def _vpdpbusd_chains(builder, pieces, tokens, starts):
    """Each token's chain of `vpdpbusd` over `pieces` ((<4n x i8> unsigned codes, block offset of
    the 4 x values they meet)), from its `starts[j]` (None: 0): <n x i32> sums, one per token."""
    n = pieces[0][0].type.count // 4
    vec32 = ir.VectorType(I32, n)
    vpdpbusd = declare(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", vec32, vec32, vec32, vec32)
    result = []
    for j, token in enumerate(tokens):
        sums = ir.Constant(vec32, None) if starts is None else starts[j]
        for codes, offset in pieces:
            sums = builder.call(vpdpbusd, [sums, builder.bitcast(codes, vec32), token.word(offset)])
        result.append(sums)
    return result
