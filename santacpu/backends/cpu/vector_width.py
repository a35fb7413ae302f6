"""Lets Numba's LLVM use 512-bit vectors on CPUs that have AVX-512 (applied by `santacpu.backends.cpu`'s
`__init__`, before any of its modules is imported).

LLVM tunes most AVX-512 CPUs to prefer 256-bit vectors (`prefer-256-bit`: wide vectors once
lowered the clock of early AVX-512 parts), so our kernels compiled to ymm code on a CPU that has
zmm. Turning that preference off made the decode kernels faster (docs/kernels.md). Numba reads
its target features once, when it first compiles, so this must run before any kernel compiles.
It sets `numba.config.CPU_FEATURES` only, never the process environment: a child process that
imports santacpu's CPU backend applies it again for itself (with the same result).

Left alone when the user chose Numba's target (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) or set
SANTACPU_VECTOR_WIDTH=256. The on-disk kernel cache is keyed by the features, so switching never
reuses code compiled for the other width.

May import: os, llvmlite, numba.
"""

from __future__ import annotations

import os

from ...settings import vector_width_from_environment



def wide_vector_features(host_features: str) -> str | None:
    """The feature string with the 256-bit preference turned off, or None where it does not
    apply (no AVX-512)."""
    if "+avx512f" not in host_features.split(","):
        return None
    return host_features + ",-prefer-256-bit"


def apply() -> None:
    """Set Numba's target features to 512-bit vectors where the CPU has AVX-512 and the user chose
    no target; does nothing elsewhere. Must run before Numba's first compilation."""
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    if vector_width_from_environment() == 256:
        return
    from llvmlite import binding

    features = wide_vector_features(binding.get_host_cpu_features().flatten())
    if features is None:
        return
    import numba

    # Numba's compiler re-reads the NUMBA_* environment variables only when one of them changed
    # since, so this holds unless the process sets one before its first compilation.
    numba.config.CPU_FEATURES = features
