"""santacpu: run the SantaCoder code model on a laptop CPU (NumPy reference, Numba kernels).

Public API: `load(model, *, revision=None, device="auto") -> Model`; see `santacpu.model`.
"""

from .errors import SantacpuError, SantacpuWarning
from .model import Model, load

__version__ = "0.1.0"

__all__ = ["Model", "SantacpuError", "SantacpuWarning", "__version__", "load"]
