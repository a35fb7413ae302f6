"""LLVM IR helpers shared by the instruction-set modules and the kernels that call them: the
scalar types, unaligned vector loads, constant splats, lane broadcasts, intrinsic declarations,
and the literal ints the kernels are compiled for.

May import: llvmlite, numba (cgutils, types).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def splat(element_type, n: int, value) -> ir.Constant:
    """<n x element_type> with every lane `value`."""
    return ir.Constant(ir.VectorType(element_type, n), [value] * n)


def load_vector(builder, data, offset, element_type, n: int):
    """Load <n x element_type> from the element pointer `data` + `offset` (unaligned)."""
    address = builder.bitcast(builder.gep(data, [offset]), ir.VectorType(element_type, n).as_pointer())
    return builder.load(address, align=1)


def declare(builder, name: str, return_type, *arg_types):
    """The function `name` (an LLVM intrinsic) declared in the builder's module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, arg_types), name)


def broadcast(builder, value, n: int):
    """<n x T> holding the scalar `value` (of type T) in every lane."""
    vector_type = ir.VectorType(value.type, n)
    single = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(single, ir.Constant(vector_type, None), ir.Constant(ir.VectorType(I32, n), [0] * n))


def widen_sum(builder, products, group: int):
    """<group n x i32> -> <n x i32>: lane i is the sum of lanes group i .. group i + group - 1
    (a tree of even/odd shuffles: exact, in any order)."""
    while group > 1:
        half = products.type.count // 2
        even = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, half), list(range(0, 2 * half, 2))))
        odd = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, half), list(range(1, 2 * half, 2))))
        products = builder.add(even, odd)
        group //= 2
    return products


def word_sums_by_piece(builder, piece, tokens, word_dot):
    """q8_0's block sums <n x i32> of each token, a piece at a time: `piece(p)` (<2n x i8>: values
    2p and 2p + 1 of each of the n rows) widened to int16, then `word_dot(sums, wide, xs)` adds
    its 2 products a lane with the token's 2 int16 values (`token.word(2 p)`). One piece is live at
    a time, the tokens' sums beside it: 16 widened pieces would not fit AVX2's 16 registers."""
    sums = []
    for p in range(16):
        codes = piece(p)
        wide = builder.sext(codes, ir.VectorType(I16, codes.type.count))
        sums = sums or [ir.Constant(ir.VectorType(I32, codes.type.count // 2), None)] * len(tokens)
        sums = [word_dot(total, wide, token.word(2 * p)) for total, token in zip(sums, tokens)]
    return sums


def with_starts(builder, sums, starts):
    """Each token's block sums plus its start (`nibble_sums`' offset term; None: none)."""
    return sums if starts is None else [builder.add(total, start) for total, start in zip(sums, starts)]


def literal(value) -> int | None:
    """A literal int type's value, else None (kernels are compiled per literal)."""
    return value.literal_value if isinstance(value, types.IntegerLiteral) else None
