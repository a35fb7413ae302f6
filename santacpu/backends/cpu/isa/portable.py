"""Portable building blocks of the row-group tiles: plain LLVM IR (widen, multiply, add), no
target intrinsic, so any CPU compiles them (LLVM picks the instructions: on AArch64 it may choose
`sdot` itself). n int32 lanes, one per row of a group.

The same exact int32 sums as `x86` and `arm64`: the testable twin of their intrinsics on every
machine, and the integer kernels of CPUs that have neither.

May import: llvmlite, `isa.llvm_ir`.
"""

from __future__ import annotations

from llvmlite import ir

from .llvm_ir import I32, byte_split_sums, widen_sum


def _products(builder, a, b, n: int, per_lane: int):
    """<n x i32>: lane i = sum of a[per_lane i + k] b[per_lane i + k], k < per_lane (a, b integer
    vectors of n per_lane elements, sign-extended: codes are < 128)."""
    wide = ir.VectorType(I32, n * per_lane)
    return widen_sum(builder, builder.mul(builder.sext(a, wide), builder.sext(b, wide)), per_lane)


def byte_dot(builder, sums, codes, xs):
    """sums <n x i32> + each lane's 4 products of `codes` <4n x i8> with the 4 int8 values in
    the same lane of `xs` <n x i32>."""
    n = sums.type.count
    return builder.add(sums, _products(builder, codes, builder.bitcast(xs, codes.type), n, 4))


def word_block_sums(builder, isa: int, n: int, load, tokens):
    """q8_0 (4-row groups, 4 values a row a lane): each token's block sums <4 x i32>, x split into
    bytes (`llvm_ir.byte_split_sums` with `byte_dot`), as NEON computes them with `sdot`."""
    return byte_split_sums(builder, load, tokens, lambda sums, codes, xs: byte_dot(builder, sums, codes, xs))


def tokens_per_call(isa: int) -> int:
    """Tokens one nibble_sums call should take (the tile accumulates each call's sums at once)."""
    return 1


def nibble_sums(builder, isa: int, lows, highs, tokens, six_bits: bool, starts=None):
    """Each token's block sums <n x i32> plus its start (as `x86.nibble_sums`)."""
    n = lows[0].type.count // 4
    result = []
    for j, token in enumerate(tokens):
        sums = ir.Constant(ir.VectorType(I32, n), None) if starts is None else starts[j]
        for v in range(4):
            sums = byte_dot(builder, sums, lows[v], token.word(4 * v))
            sums = byte_dot(builder, sums, highs[v], token.word(16 + 4 * v))
        result.append(sums)
    return result
