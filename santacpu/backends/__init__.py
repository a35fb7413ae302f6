"""Backends: the few operations a forward pass needs (`base.Backend`, a `typing.Protocol`), and
their implementations, one subpackage each (`cpu`: Numba kernels and NumPy/BLAS). Backends are
independent of each other; each may share the protocol module and nothing else of its siblings.

The device names `load(device=...)` takes (`DEVICES`) are here, where the command line reads them
without importing a backend.

May import: `santacpu.formats` and the foundation modules (errors, config); never the network,
loading, generation or the API above them.
"""

DEVICES = ("auto", "cpu", "cuda")  # what `load(device=...)` and `--device` take ("auto": a usable GPU, else the CPU)
