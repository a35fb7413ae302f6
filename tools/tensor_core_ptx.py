"""Compile the tensor-core prompt kernel (santacpu/backends/cuda/tensor_cores.py) to PTX for
sm_80 and sm_90 and assemble it with `ptxas`, without a GPU or a CUDA driver: its inline PTX is
checked by the assembler, and ptxas's resource lines (registers, shared memory, stack) printed.

Needs libNVVM and ptxas (a CUDA toolkit); numba.cuda asks the driver for the compute capability
of device functions, so this script answers 8.0 in its place (the kernel is then compiled for
each target).

    python -m tools.tensor_core_ptx
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import types as pytypes
from pathlib import Path

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda, types  # noqa: E402
import numba.cuda.dispatcher as dispatcher  # noqa: E402

dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(8, 0))  # no driver here

from santacpu.backends.cuda import tensor_cores as tc  # noqa: E402


def _array(dtype, ndim: int = 2):
    return types.Array(dtype, ndim, "C")


# The parts p0..p4 of each format as the backend uploads them (values.py), then x, n_tokens, bias, out, epilogue.
PARTS = {
    "q8_0": (types.int8, types.uint16, types.uint8, types.uint8, types.uint8),
    "q4_0": (types.uint8, types.uint16, types.uint8, types.uint8, types.uint8),
    "q6_0": (types.uint8, types.uint8, types.uint16, types.uint8, types.uint8),
    "q4_m": (types.uint8, types.uint8, types.uint8, types.float32, types.float32),
}


def main() -> int:
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        print("tensor_core_ptx: no ptxas on PATH (a CUDA toolkit's bin/)", file=sys.stderr)
        return 2
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, parts in PARTS.items():
            signature = (types.int64, *(_array(p) for p in parts), _array(types.float32), types.int64,
                         _array(types.float32, 1), _array(types.float32), types.int64)
            for cc in ((8, 0), (9, 0)):
                ptx, _ = cuda.compile_ptx(tc.matmul_tc.py_func, signature, cc=cc)
                path = Path(folder) / f"{name}-sm{cc[0]}{cc[1]}.ptx"
                path.write_text(ptx)
                done = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path), "-o", str(path) + ".cubin"],
                                      capture_output=True, text=True)
                resources = [line.split(": ", 1)[-1] for line in done.stderr.splitlines() if "registers" in line]
                print(f"{name} sm_{cc[0]}{cc[1]}: ptxas exit {done.returncode}, {ptx.count('mma.sync')} mma.sync; "
                      f"{'; '.join(resources) or done.stderr.strip()}")
                failures += done.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
