"""Device functions shared by every kernel: reading the stored formats one value at a time; and
`LANES`, the lanes of a warp the kernels are written for.

No function here calls `cuda.*` (barriers, shuffles): those live in the module of the kernels that
call them (`linear_kernels.warp_total`, `layer_kernels.block_sum`). The simulator swaps its fake
`cuda` into a device function's module at each call and back at its return, which is not
thread-safe (a thread returning restores the real module while another is still inside); a
kernel's own module it swaps once for the whole launch.

Every weight is passed to a kernel as five arrays `p0..p4` (the format's parts in
`santacpu.formats.blocks.PART_ORDER`, then 1x1 placeholders) and read as
`scale * code(...) - offset`, with `(scale, offset) = params(..., row, block)` once per block of
32 values. fp16 data (weights, block scales, the KV cache) travels as its uint16 bits and is
widened here: on a GPU by its conversion instruction, under the simulator (which has no half
type) by integer arithmetic and a table of powers of two; both exact.

Format ids (`santacpu.formats.blocks.WEIGHT_FORMAT_IDS`, named below) are compile-time constants
of each kernel (a kernel is built per format by the factories in linear_kernels.py and
layer_kernels.py), so the branches below vanish.

May import: numba, numpy, llvmlite, `santacpu.formats.blocks`.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
from numba import config, cuda, float32, int32

from ...formats.blocks import FORMATS, WEIGHT_FORMAT_IDS

# Warp shuffles on a GPU; the simulator has none (numba's own simulator), so there a warp's sum
# goes through shared memory and block barriers (see linear_kernels.warp_total).
SIMULATED = bool(config.ENABLE_CUDASIM)
WARP_SHUFFLES = not SIMULATED
# Lanes of a "warp" as the kernels use it (blockDim.x of the warp-per-row and warp-per-head
# kernels, the stride between a lane's elements, their shared-memory scratch): a GPU's 32. The
# simulator runs every thread as a Python thread, polled at every barrier, so there a warp is 4
# lanes (each doing 8 lanes' work): the same code, on far fewer threads. The kernels are written
# for any power of two; warp_total's shuffles for 32 (a full mask), which they only run on.
SIMULATOR_LANES = 4
LANES = SIMULATOR_LANES if SIMULATED else 32
assert LANES & (LANES - 1) == 0 and (LANES == 32 or not WARP_SHUFFLES)


def _locked_simulator_shared_arrays() -> None:
    """The simulator makes a block's `cuda.shared.array` when the first of its threads reaches
    the line (`FakeCUDAShared.array`: look the line up, else make the array and store it), with
    no lock: two threads that both miss each make an array of their own, and the block's threads
    then write and read different memory (whole rows of wrong results, now and then; likelier
    under the backend's short switch interval, where threads interleave anywhere). The same
    lookup, keyed by the caller's file and line as the simulator's, under a lock."""
    from numba.core import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support

    original, lock = FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer, nothing looked up
            return original(self, shape, dtype)
        caller = sys._getframe(1)
        line = (caller.f_code.co_filename, caller.f_lineno)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        with lock:
            made = self._allocations.get(line)
            if made is None:
                made = self._allocations[line] = np.empty(shape, dtype)
        return made

    FakeCUDAShared.array = array


if SIMULATED:
    _locked_simulator_shared_arrays()

FORMAT_IDS = WEIGHT_FORMAT_IDS
F32, F16, Q8_0, Q4_0, Q6_0, Q4_M = (FORMAT_IDS[name] for name in ("float32", "float16", "q8_0", "q4_0", "q6_0", "q4_m"))
Q4_0_OFFSET, Q6_0_OFFSET = FORMATS["q4_0"].code_offset, FORMATS["q6_0"].code_offset

# 2**(e - 25) for a half's exponent field e: a normal half is (1024 + mantissa) * POW2[e], a
# subnormal one mantissa * POW2[1] (both products exact in float32).
_POW2 = np.array([2.0 ** (e - 25) for e in range(32)], np.float32)
# 2**e for e = -14..16 at index e + 14 (float_to_half's exponent search).
_POW2_HALF = np.array([2.0**e for e in range(-14, 17)], np.float32)


@cuda.jit(device=True, inline=True)
def half_to_float_by_integers(bits):
    """IEEE half bits (an integer 0..65535) -> float32, exactly, by integer arithmetic."""
    h = int32(bits)
    exponent = (h >> 10) & 31
    mantissa = h & 1023
    if exponent == 0:
        value = float32(mantissa) * _POW2[1]
    elif exponent == 31:
        value = float32(math.inf) if mantissa == 0 else float32(math.nan)
    else:
        value = float32(1024 + mantissa) * _POW2[exponent]
    return -value if h & 32768 else value


@cuda.jit(device=True, inline=True)
def float_to_half_by_integers(value):
    """float32 -> IEEE half bits, rounded to nearest even (NumPy's astype(float16)), by integer
    arithmetic."""
    if value != value:
        return 0x7E00
    sign = 32768 if math.copysign(float32(1.0), value) < 0 else 0  # -0.0 too
    a = abs(value)
    if a >= 65520.0:  # rounds to infinity
        return sign | 0x7C00
    if a < _POW2_HALF[0]:  # subnormal (or zero): units of 2**-24; 1024 is the smallest normal
        return sign | int32(round(a * float32(16777216.0)))
    # a in [2**e, 2**(e+1)), e = -14..15
    e = int32(math.floor(math.log2(a)))
    e = max(-14, min(15, e))
    if a < _POW2_HALF[e + 14]:
        e -= 1
    elif a >= _POW2_HALF[e + 15]:
        e += 1
    code = int32(round(a / _POW2_HALF[e + 14] * float32(1024.0)))  # 1024..2048, exact scaling
    if code == 2048:
        code = 1024
        e += 1
    if e > 15:
        return sign | 0x7C00
    return sign | ((e + 15) << 10) | (code - 1024)


# On a GPU the conversions are one instruction each (cvt.f32.f16, cvt.rn.f16.f32: LLVM's fpext and
# fptrunc of `half`), the same values as the integer versions above (IEEE conversions are exact,
# and round to nearest even); those read a table of powers of two in constant memory, one
# serialized read for each distinct exponent in a warp. The simulator, and a numba.cuda without
# intrinsics, keep the integer versions.
HARDWARE_HALVES = False
if not SIMULATED:
    try:
        from llvmlite import ir
        from numba import types
        from numba.cuda.extending import intrinsic
    except ImportError:  # the integer versions serve
        intrinsic = None

    if intrinsic is not None:

        @intrinsic
        def _fpext_half(typingctx, bits):
            """float32 of the IEEE half whose bits are the low 16 of the integer `bits`."""
            if not isinstance(bits, types.Integer):
                return None

            def codegen(context, builder, signature, args):
                (b,) = args
                width = b.type.width
                h = builder.trunc(b, ir.IntType(16)) if width > 16 else builder.zext(b, ir.IntType(16)) if width < 16 else b
                return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

            return types.float32(bits), codegen

        @intrinsic
        def _fptrunc_half(typingctx, value):
            """The IEEE half bits (int32 0..65535) of float32 `value`, rounded to nearest even."""
            if value != types.float32:
                return None

            def codegen(context, builder, signature, args):
                h = builder.fptrunc(args[0], ir.HalfType())
                return builder.zext(builder.bitcast(h, ir.IntType(16)), ir.IntType(32))

            return types.int32(value), codegen

        HARDWARE_HALVES = True

if HARDWARE_HALVES:

    @cuda.jit(device=True, inline=True)
    def half_to_float(bits):
        """IEEE half bits (an integer 0..65535) -> float32, exactly."""
        return _fpext_half(int32(bits))  # (int32: a kernel compiled for a float format types this branch too)

    @cuda.jit(device=True, inline=True)
    def float_to_half(value):
        """float32 -> IEEE half bits, rounded to nearest even (NumPy's astype(float16); NaN as
        NumPy's 0x7E00, not the instruction's 0x7FFF)."""
        if value != value:
            return int32(0x7E00)
        return _fptrunc_half(float32(value))

else:
    half_to_float = half_to_float_by_integers
    float_to_half = float_to_half_by_integers


@cuda.jit(device=True, inline=True)
def params(fmt, p0, p1, p2, p3, p4, row, block):
    """(scale, offset) of block `block` (32 values) of `row`."""
    if fmt == Q8_0 or fmt == Q4_0:  # d f16 in p1
        return half_to_float(p1[row, block]), float32(0.0)
    if fmt == Q6_0:  # d f16 in p2
        return half_to_float(p2[row, block]), float32(0.0)
    if fmt == Q4_M:  # (d * sc, dmin * mn)
        return float32(p3[row, 0]) * float32(p1[row, block]), float32(p4[row, 0]) * float32(p2[row, block])
    return float32(1.0), float32(0.0)


@cuda.jit(device=True, inline=True)
def code(fmt, p0, p1, p2, p3, p4, row, block, j):
    """Value j (0..31) of a block before its scale: the stored integer less the format's offset
    (or the float itself for float32 / float16 weights)."""
    column = block * 32 + j
    if fmt == F32:
        return float32(p0[row, column])
    if fmt == F16:
        return half_to_float(p0[row, column])
    if fmt == Q8_0:
        return float32(p0[row, column])
    byte = int32(p0[row, block * 16 + (j & 15)])
    nibble = (byte >> 4) if j >= 16 else (byte & 15)
    if fmt == Q4_0:
        return float32(nibble - Q4_0_OFFSET)
    if fmt == Q6_0:
        high = (int32(p1[row, block * 8 + (j & 7)]) >> (2 * (j >> 3))) & 3
        return float32((nibble | (high << 4)) - Q6_0_OFFSET)
    return float32(nibble)  # q4_m


@cuda.jit(device=True, inline=True)
def value(fmt, p0, p1, p2, p3, p4, row, column):
    """One weight value, scale applied (embedding lookups; products use params and code)."""
    block = column // 32
    scale, offset = params(fmt, p0, p1, p2, p3, p4, row, block)
    return scale * code(fmt, p0, p1, p2, p3, p4, row, block, column - block * 32) - offset
