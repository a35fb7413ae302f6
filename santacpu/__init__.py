"""santacpu: run the SantaCoder code model on a laptop CPU (NumPy reference, Numba kernels).

Public API: `load(model, *, revision=None, quant=None (q8_0), device="auto") -> Model`, `GenerationOptions`; see
`santacpu.model`.
Importing santacpu changes one environment variable, `TOKENIZERS_PARALLELISM=false` where it is
unset (see `santacpu.tokenizer`); no Numba setting (the CPU backend's target is chosen when a
backend is made: `santacpu.backends.cpu.target`).

May import: `santacpu.model`, `santacpu.generation.options`, `santacpu.errors`, `santacpu.version` (the
API re-exported here).
"""

from .errors import SantacpuError, SantacpuWarning
from .generation.options import GenerationOptions
from .model import Model, load
from .version import __version__

__all__ = ["GenerationOptions", "Model", "SantacpuError", "SantacpuWarning", "__version__", "load"]
