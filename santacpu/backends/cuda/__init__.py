"""The CUDA backend: `CudaBackend` (backend.py) runs the same packed files on an NVIDIA GPU through
`numba.cuda` (the `cuda` extra, numba-cuda): weights uploaded once as stored, the KV cache and the
activations on the device, only token ids in and the wanted logits out.

Nothing here is imported until a model is loaded with device "cuda" (or "auto" finds a GPU):
`device.py` answers whether a GPU is usable, and why not, without compiling anything. Kernels:
`values.py` (device functions that read one value of each stored format, and fp16 bits),
`linear_kernels.py` (matrix products on the packed formats), `layer_kernels.py` (embeddings,
LayerNorm, the KV cache, attention, a copy kernel for the bandwidth yardstick). Each kernel has
its NumPy twin in `santacpu.network.reference` or `santacpu.formats.blocks` and is tested
against it under the simulator (`NUMBA_ENABLE_CUDASIM=1`) in tests/test_cuda_kernels.py.

May import: numba, numpy, `santacpu.formats`, `santacpu.errors`; no other backend.
"""

import numpy as _np

# numba-cuda 0.30 registers an overload for np.row_stack when it first compiles, and NumPy 2.5
# removed that alias (seen on a GPU machine with both): give it back, as the vstack it always was.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack
