"""The CPU backend: `CpuBackend` (backend.py) over Numba kernels (cpu_kernels, quant_kernels,
int_dot, row_groups over the instruction-set modules of `isa/`, for the `target.CpuTarget` the
backend is made with), and the page read-speed yardstick (read_speed).

Importing this package sets Numba's target features for it (`vector_width.apply`: 512-bit
vectors on AVX-512 CPUs), in `numba.config` only (the process environment is left alone), before
any of its kernels can compile: Numba reads the features at its first compilation, and int_dot
picks its instruction set from them when it is imported.

May import: `santacpu.formats`, `santacpu.errors`; no other backend.
"""

from . import vector_width

vector_width.apply()
