"""santacpu: run the SantaCoder code model on a laptop CPU (NumPy reference, Numba kernels).

Public API: `load(model, *, revision=None, device="auto") -> Model`, `GenerationOptions`; see
`santacpu.model`.
Importing santacpu changes one environment variable, `TOKENIZERS_PARALLELISM=false` where it is
unset (see `santacpu.tokenizer`); the CPU backend sets Numba's target features in `numba.config`
when it is imported (see `santacpu.backends.cpu.vector_width`).

May import: `santacpu.model`, `santacpu.generation.options`, `santacpu.errors` (the API re-exported
here).
"""

from .errors import SantacpuError, SantacpuWarning
from .generation.options import GenerationOptions
from .model import Model, load

__version__ = "0.1.0"

__all__ = ["GenerationOptions", "Model", "SantacpuError", "SantacpuWarning", "__version__", "load"]
