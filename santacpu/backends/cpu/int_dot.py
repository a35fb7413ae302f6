"""How the integer kernels round x, and which x86 instruction set they run: what the row groups'
kernels (`repack.py`) take from here.

Each token's x is rounded per block of 32 values to integers with one float32 scale (as llama.cpp
does for its quantized dot products): to int8 (max |x| -> 127) against 4- and 6-bit codes, to int16
(32767) against q8_0's (a target may round q8_0's layer matrices to int8: `target.INT8_X_ROLES`).
`reference.round_activations` is its NumPy twin. `ISA` names the x86 instruction set of this CPU's
integer kernels (None: none, also on ARM64, whose targets `target.py` names).

Until 2026-12-07 this module also had integer kernels of its own that kept a row's codes across a
vector's lanes; the row groups replaced them for every matrix the backend prepares, and they were
removed once nothing but their tests ran them (docs/kernels.md, "Integer dot products").

May import: numba, numpy, `santacpu.backends.cpu.cpu_kernels` (FASTMATH), `santacpu.backends.cpu.target`,
`santacpu.formats.blocks`, `santacpu.kernel_cache`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...formats.blocks import QK
from ...kernel_cache import track_kernel_sources
from .cpu_kernels import FASTMATH
from .target import compile_features, host_target

track_kernel_sources()  # before the first cache=True kernel (see santacpu.kernel_cache)

# The x86 targets' instruction sets by these names (target.TARGETS states what each one needs).
_ISA_OF_TARGET = {"avx512-vnni": "vnni512", "avx-vnni": "vnni256", "avx2": "avx2"}


def choose_isa(features: set[str]) -> str | None:
    """'vnni512', 'vnni256', 'avx2', or None (no x86 integer instructions) for a feature set."""
    best = host_target(features)
    return _ISA_OF_TARGET.get(best.name) if best is not None else None


ISA = choose_isa(compile_features())
# The formats with integer kernels, and the integer range x is rounded to for each.
ACTIVATION_LEVELS = {"q8_0": 32767, "q4_0": 127, "q4_m": 127, "q6_0": 127}
FORMATS = tuple(ACTIVATION_LEVELS)


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
