"""Whether a CUDA GPU is usable, and why not, in words, without compiling anything.

`gpu_missing()` is what `device="auto"` asks: None when a real GPU is usable. It first tries to
open the driver library (a machine without one pays a failed `dlopen`, not Numba's CUDA import),
then asks `numba.cuda`. The simulator (`NUMBA_ENABLE_CUDASIM=1`) is not a GPU: `auto` never picks
it, but `device="cuda"` runs on it (the kernels' tests do), see `cuda_missing()`.

May import: numba, `santacpu.errors`.
"""

from __future__ import annotations

import ctypes

EXTRA_HINT = "pip install 'santacpu[cuda]'"


def simulated() -> bool:
    """Whether Numba's CUDA simulator is on (kernels run as Python threads on the CPU)."""
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def gpu_missing() -> str | None:
    """None when a real CUDA GPU is usable from numba.cuda; else the reason, one line."""
    if simulated():
        return "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1), which is not a GPU"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver found (libcuda.so.1 cannot be loaded)"
    try:
        from numba import cuda
    except ImportError as error:
        return f"numba's CUDA target cannot be imported ({error}); {EXTRA_HINT}"
    try:
        if cuda.is_available() and len(cuda.gpus) > 0:
            return None
    except Exception as error:  # the driver's own failure, in its words
        return f"the CUDA driver failed: {error}"
    return "numba.cuda finds no usable CUDA device (driver present, but no device or an unsupported one)"


def cuda_missing() -> str | None:
    """None when `device="cuda"` can run: a real GPU, or the simulator; else the reason."""
    return None if simulated() else gpu_missing()
