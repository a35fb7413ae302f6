"""The CPU backend: `CpuBackend` (backend.py) over the prepared linears and format table of
`kernels.py`, the Numba kernels (cpu_kernels, quant_kernels, repack (row groups, x rounded as int_dot says) over the
instruction-set modules of `isa/`, for the `target.CpuTarget` the backend is made with), and the
page read-speed yardstick (read_speed). Importing it changes no Numba setting.

May import: `santacpu.formats`, `santacpu.errors`; no other backend.
"""
