"""santacpu: run the SantaCoder code model on a laptop CPU (NumPy reference, Numba kernels).

Public API: `load(model, *, revision=None, device="auto") -> Model`; see `santacpu.model`.
"""

from . import vector_width

vector_width.apply()  # before any kernel compiles

from .errors import SantacpuError, SantacpuWarning  # noqa: E402
from .model import Model, load  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Model", "SantacpuError", "SantacpuWarning", "__version__", "load"]
