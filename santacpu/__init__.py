"""santacpu: run the SantaCoder code model on a laptop CPU (NumPy reference, Numba kernels).

Public API: `load(model, *, revision=None, quant=None (q8_0), device="auto") -> Model`, `GenerationOptions`; see
`santacpu.model`.
Importing santacpu changes one environment variable, `TOKENIZERS_PARALLELISM=false` where it is
unset (see `santacpu.tokenizer`); no Numba setting (the CPU backend's target is chosen when a
backend is made: `santacpu.backends.cpu.target`).

The operating system (Linux or macOS: `settings.platform_problem`) and Numba's variables
(`NUMBA_NUM_THREADS`, `NUMBA_THREADING_LAYER`) are checked before Numba is imported: a problem is
a SantacpuError, and for the command line one error line.

The API's names load on first use (PEP 562), so that importing the package (or `santacpu.errors`,
or the console script's `santacpu.__main__`) does not import NumPy and Numba: a Ctrl-C while the
command line's modules load is then the command line's own one-line "interrupted".

May import: `santacpu.model`, `santacpu.generation.options`, `santacpu.errors`, `santacpu.version` (the
API re-exported here), `santacpu.settings` (the check above).
"""

import importlib as _importlib
import importlib.util as _importlib_util
import os as _os
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING, Any as _Any, List as _List

from .errors import SantacpuError, SantacpuWarning
from .settings import numba_environment_problem as _numba_environment_problem
from .settings import platform_problem as _platform_problem


def _refuse_unusable_environment() -> None:
    problem = _platform_problem() or _numba_environment_problem()
    if problem is None:
        return
    argv = getattr(_sys, "orig_argv", _sys.argv)  # (a package's __init__ runs before `-m` sets argv)
    if _os.path.basename(argv[1] if len(argv) > 1 else "") == "santacpu" or argv[1:3] == ["-m", "santacpu"]:
        print(f"santacpu: error: {problem}", file=_sys.stderr)
        raise SystemExit(1)
    raise SantacpuError(problem)


_refuse_unusable_environment()
from .version import __version__

if _TYPE_CHECKING:
    from .generation.options import GenerationOptions
    from .model import Model, load

__all__ = ["GenerationOptions", "Model", "SantacpuError", "SantacpuWarning", "__version__", "load"]


def __getattr__(name: str) -> _Any:
    if name == "GenerationOptions":
        from .generation.options import GenerationOptions

        return GenerationOptions
    if name in ("Model", "load"):
        from . import model

        return getattr(model, name)
    # A submodule named as an attribute (`santacpu.model.runnable_model` after `import santacpu`), as
    # when the package imported them all.
    if name.isidentifier() and not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}"):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'santacpu' has no attribute {name!r}")


def __dir__() -> _List[str]:
    own = {name for name in globals() if name.startswith("__") or not name.startswith("_")}  # (not the helpers)
    return sorted(own | set(__all__))
