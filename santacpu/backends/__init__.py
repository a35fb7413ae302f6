"""Backends: the few operations a forward pass needs (`base.Backend`, a `typing.Protocol`), and
their implementations, one subpackage each (`cpu`: Numba kernels and NumPy/BLAS). Backends are
independent of each other; each may share the protocol module and nothing else of its siblings.

May import: `santacpu.formats` and the foundation modules (errors, config); never the network,
loading, generation or the API above them.
"""
