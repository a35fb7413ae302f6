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


def byte_split_sums(builder, load, tokens, dot, unsigned_dot=None):
    """q8_0's block sums <4 x i32> of each token for 4-row groups interleaved 4 values a row, with
    4-value int8 dot products only (`dot(sums, codes <16 x i8>, xs <4 x i32>)`: each lane's 4
    products with the 4 int8 values in the same lane of xs, added to sums; `unsigned_dot` the
    same with xs' bytes unsigned, where the CPU has one).

    With hi = x >> 8 (signed) and lo = (x & 255) - 128 (signed), x = 256 hi + lo + 128, so a row's
    block sum is 256 (codes . hi) + (codes . lo) + 128 (its codes' sum): exact int32 sums of int8
    products (each at most 32 x 128 x 128), the same integers as int16 products give. Vector k
    (`load(16 k, 16)`) holds values 4k..4k+3 of each row; the codes' sums are taken once a block
    for all the tokens; a token's x is loaded as 4 vectors of 8 int16 values and its high and low
    bytes picked out by shuffles (NEON: `ld2`), x's 4 values for vector k broadcast from a lane.
    With `unsigned_dot`, lo = x & 255 as it is: x = 256 hi + lo, no codes' sums."""
    vec8, vec32 = ir.VectorType(I8, 16), ir.VectorType(I32, 4)
    rows = [load(16 * k, 16) for k in range(8)]
    offset = ir.Constant(vec32, None)
    if unsigned_dot is None:
        for codes in rows:
            offset = dot(offset, codes, splat(I32, 4, 0x01010101))
        offset = builder.shl(offset, splat(I32, 4, 7))  # 128 x the codes' sums
    result = []
    for token in tokens:
        eights = [builder.bitcast(token.quad(8 * q), vec8) for q in range(4)]  # x's values 8q..8q+7, low byte first
        pick = lambda h, first: builder.bitcast(  # noqa: E731
            builder.shuffle_vector(eights[2 * h], eights[2 * h + 1], ir.Constant(ir.VectorType(I32, 16), list(range(first, 32, 2)))), vec32
        )
        highs = [pick(h, 1) for h in (0, 1)]  # values 16h..16h+15, as <4 x i32> of 4 bytes
        lows = [pick(h, 0) if unsigned_dot else builder.xor(pick(h, 0), splat(I32, 4, 0x80808080)) for h in (0, 1)]
        high_sums, low_sums = ir.Constant(vec32, None), offset  # (a chain's start costs nothing)
        for k, codes in enumerate(rows):  # x's values 4k..4k+3: word k % 4 of half k // 4
            word = ir.Constant(ir.VectorType(I32, 4), [k % 4] * 4)
            high_sums = dot(high_sums, codes, builder.shuffle_vector(highs[k // 4], highs[k // 4], word))
            low_sums = (unsigned_dot or dot)(low_sums, codes, builder.shuffle_vector(lows[k // 4], lows[k // 4], word))
        result.append(builder.add(builder.shl(high_sums, splat(I32, 4, 8)), low_sums))
    return result


def with_starts(builder, sums, starts):
    """Each token's block sums plus its start (`nibble_sums`' offset term; None: none)."""
    return sums if starts is None else [builder.add(total, start) for total, start in zip(sums, starts)]


def literal(value) -> int | None:
    """A literal int type's value, else None (kernels are compiled per literal)."""
    return value.literal_value if isinstance(value, types.IntegerLiteral) else None
