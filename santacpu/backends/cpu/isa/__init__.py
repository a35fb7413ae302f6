"""The instruction sets of the CPU kernels, one module each, all giving the same building blocks
for the row-group tiles (`repack.py`): exact int32 sums of a block's products, per row lane.

- `x86`: AVX2 (`vpmaddubsw` / `vpmaddwd` chains), AVX-VNNI and AVX-512 VNNI (`vpdpbusd`,
  `vpdpwssd`);
- `arm64`: NEON `sdot` (the dotprod extension) and `smmla` (i8mm, token pairs of a prompt tile);
- `portable`: plain LLVM IR with no target intrinsic (any CPU: LLVM picks its instructions);
- `llvm_ir`: the IR helpers they share (types, loads, splats, declarations).

Every module computes the same integers, so every instruction set gives the same results bit for
bit. Which one runs is `target.CpuTarget.isa`, a literal constant of the kernels; `for_isa` maps
it to its module. Only `santacpu.backends.cpu` imports these modules (an import-linter contract).

May import: llvmlite, numba (cgutils), each other.
"""

from __future__ import annotations

from types import ModuleType

# The instruction-set ids (literal constants of the kernels: each compiles its own code).
AVX2, VNNI256, VNNI512, NEON_DOT, NEON_I8MM, PORTABLE = range(6)


def for_isa(isa: int) -> ModuleType:
    """The module whose building blocks serve instruction set `isa`."""
    if isa in (AVX2, VNNI256, VNNI512):
        from . import x86

        return x86
    if isa in (NEON_DOT, NEON_I8MM):
        from . import arm64

        return arm64
    if isa == PORTABLE:
        from . import portable

        return portable
    raise ValueError(f"no instruction set with id {isa}")
