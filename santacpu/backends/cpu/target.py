"""Which instruction set the integer kernels compile for: `CpuTarget`, chosen when a backend is
made (`CpuBackend(target=...)`, by default `host_target()`), never at import.

A target names its instruction set (an `isa` id, a literal constant of the kernels: each compiles
its own code), the rows of a row group (one int32 lane each: the vector's width) and the widest
token tile (the accumulators and a block's codes fit the register file). It is offered only where
the CPU features Numba compiles for have its instructions: code for an extension the CPU lacks
aborts LLVM (or dies of SIGILL). On Linux/ARM64 the kernel's hardware capabilities (auxv) must
agree as well, so a Numba target set by hand never runs instructions the CPU lacks.

Every target computes the same integers, so all give the same results bit for bit; the tests
run each one this machine can run, in-process.

May import: llvmlite, numba (config), `santacpu.backends.cpu.isa`.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass

from .isa import AVX2, NEON_DOT, NEON_I8MM, PORTABLE, VNNI256, VNNI512


@dataclass(frozen=True)
class CpuTarget:
    """An instruction set of the integer kernels and the tile shapes that suit it."""

    name: str
    isa: int  # the kernels' literal (isa.AVX2, ...)
    rows_per_group: int  # n: rows interleaved together, one int32 lane each
    tile_tokens: int  # tokens of the widest many-token tile
    requires: tuple[frozenset[str], ...]  # LLVM target features: any one of these sets suffices
    q8_0_tile_tokens: int | None = None  # q8_0's widest tile where it differs (NEON: x as bytes)
    # The matrices (LayerWeights roles) whose q8_0 products round x to int8 rather than int16.
    int8_x_roles: frozenset[str] = frozenset()

    def runs_on(self, features: set[str]) -> bool:
        return any(needed <= features for needed in self.requires)

    def widest_tile(self, qtype: str) -> int:
        """Tokens of the widest many-token tile for a row-group format."""
        return (self.q8_0_tile_tokens or self.tile_tokens) if qtype == "q8_0" else self.tile_tokens


# q8_0 matrices whose products round x to int8 on the VNNI targets, where `vpdpbusd` takes it at
# twice `vpdpwssd`'s rate: every layer matrix, so a prompt runs at the 4-bit tiles' rate; the LM
# head (one token a prompt) keeps int16 x. q8_0's mean KL divergence stays below llama.cpp Q8_0's
# (0.75-0.9x on the trained fixtures, against 0.4-0.5x with int16 x: docs/kernels.md). Elsewhere
# int8 x would buy no speed (AVX2 has no 8-bit product that takes signed codes and signed x).
INT8_X_ROLES = frozenset({"attn_c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj"})

# Best first. AVX-512 CPUs have 32 vector registers (8-token tiles), AVX2 ones 16 (4 tokens);
# AVX-VNNI CPUs without AVX-512 (Intel's since Alder Lake) have 16 too: their 4-bit tiles take
# 8 tokens with a few spills and still fewer instructions; q8_0's 8-token tile spills heavily
# (so 4). NEON has 32 registers of 128 bits (4 rows a group); its q8_0 tiles hold
# each token's x twice (high and low bytes), and 8 of them spilled registers (docs/kernels.md).
TARGETS = (
    CpuTarget("avx512-vnni", VNNI512, 16, 8, (frozenset({"avx512vnni", "avx512bw"}),), int8_x_roles=INT8_X_ROLES),
    CpuTarget(
        "avx-vnni", VNNI256, 8, 8, (frozenset({"avxvnni"}), frozenset({"avx512vnni", "avx512vl"})), q8_0_tile_tokens=4,
        int8_x_roles=INT8_X_ROLES,
    ),
    CpuTarget("avx2", AVX2, 8, 4, (frozenset({"avx2"}),)),
    CpuTarget("neon-i8mm", NEON_I8MM, 4, 8, (frozenset({"neon", "dotprod", "i8mm"}),), q8_0_tile_tokens=4),
    CpuTarget("neon-dotprod", NEON_DOT, 4, 8, (frozenset({"neon", "dotprod"}),), q8_0_tile_tokens=4),
    CpuTarget("portable", PORTABLE, 4, 4, (frozenset(),)),
)
BY_NAME = {target.name: target for target in TARGETS}
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_HWCAP_ASIMDDP, _HWCAP2_I8MM = 1 << 20, 1 << 13


def compile_features() -> set[str]:
    """The CPU features Numba compiles for (as Numba decides them: NUMBA_CPU_FEATURES, or the
    host's), without the '+'; on ARM64 limited to what the kernel says the CPU has."""
    from numba.core import config

    text = config.CPU_FEATURES
    if text is None:
        from numba.core.codegen import get_host_cpu_features

        text = get_host_cpu_features()
    features = {f[1:] for f in text.split(",") if f.startswith("+")}
    if platform.machine().lower() in ("arm64", "aarch64"):
        features |= {"neon"} | _implied_by_name()  # NEON is part of every ARMv8-A CPU
        hardware = _arm64_hardware()
        if hardware is not None:
            features = (features - {"dotprod", "i8mm"}) | (features & hardware)
    return features


def _implied_by_name() -> set[str]:
    """Apple's CPUs: LLVM implies their features from the CPU name (the feature string can be
    empty): dotprod from the M1 on, i8mm from the M2 on."""
    from numba.core import config

    name = config.CPU_NAME
    if name is None:
        from llvmlite import binding

        name = binding.get_host_cpu_name()
    if name == "apple-m1":
        return {"neon", "dotprod"}
    if name.startswith("apple-m"):
        return {"neon", "dotprod", "i8mm"}
    return set()


def _arm64_hardware() -> set[str] | None:
    """{'neon', 'dotprod', 'i8mm'} as far as Linux's hardware capabilities (getauxval) have them;
    None where they cannot be read (not Linux)."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (AttributeError, OSError):
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    found = {"neon"}
    if getauxval(_AT_HWCAP) & _HWCAP_ASIMDDP:
        found.add("dotprod")
    if getauxval(_AT_HWCAP2) & _HWCAP2_I8MM:
        found.add("i8mm")
    return found


def hardware_features() -> str:
    """This ARM64 CPU's features as a Numba target feature string ('+neon,+dotprod,...'), from
    the hardware capabilities: for NUMBA_CPU_FEATURES where LLVM cannot see the CPU (under QEMU
    user-mode emulation); '' elsewhere."""
    found = _arm64_hardware() if platform.machine().lower() in ("arm64", "aarch64") else None
    return ",".join("+" + name for name in sorted(found or ()))


def runnable_targets(features: set[str] | None = None) -> tuple[CpuTarget, ...]:
    """The targets these features (default: `compile_features()`) can run, best first; the
    portable one is always last."""
    if features is None:  # asked on every product: found once per Numba target setting (~20 us)
        from numba.core import config

        return _host_targets(config.CPU_NAME, config.CPU_FEATURES)
    return tuple(target for target in TARGETS if target.runs_on(features))


@functools.lru_cache(maxsize=4)
def _host_targets(cpu_name: str | None, cpu_features: str | None) -> tuple[CpuTarget, ...]:
    return runnable_targets(compile_features())


def host_target(features: set[str] | None = None) -> CpuTarget | None:
    """The best target with instruction-set kernels for these features (default: this CPU's);
    None where only the portable one runs (the float kernels serve there)."""
    best = runnable_targets(features)[0]
    return None if best.isa == PORTABLE else best


if __name__ == "__main__":  # tools/arm64_check.sh: the emulated CPU model's features for Numba
    print("hardware features:", hardware_features())
    print("runnable targets:", ", ".join(target.name for target in runnable_targets()))
