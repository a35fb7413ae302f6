"""Compile every CUDA kernel the backend launches to PTX for sm_80 and sm_90 and assemble it with
`ptxas`, without a GPU or a CUDA driver: what the GPU's numba-cuda would compile at its first
launch, checked before GPU time is spent, with ptxas's resource lines (registers, spills, stack,
shared memory) for each kernel.

Which kernels, with which argument types: the CUDA tests (tests/test_cuda.py,
tests/test_cuda_graphs.py) run first under the simulator in a child process, recording every
launch of a santacpu kernel and its argument types (numba.typeof of the arrays the simulator
holds); then each
distinct (kernel, types) is compiled here with the simulator off. Numba asks the driver for the
compute capability of device functions, so this script answers 8.0 in its place (the kernels
are then compiled for each target).

Needs libNVVM and ptxas (a CUDA toolkit; CUDA_HOME pointing at it, its bin/ on PATH), NVRTC, and
numba-cuda (the GPU machine's version: numba's own numba.cuda is older), e.g. in a scratch venv:
`pip install -e ".[cuda,test]" nvidia-cuda-nvrtc` (and `nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm` to read the machine code: `cuobjdump -sass` of a cubin ptxas wrote).

    python -m tools.ptx_check                        # every kernel, sm_80 and sm_90
    python -m tools.ptx_check attention              # kernels whose name contains "attention"
    python -m tools.ptx_check --launches FILE [NAME] # FILE: the recording to reuse, made if missing
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cuda.py", "tests/test_cuda_graphs.py"]
TARGETS = ((8, 0), (9, 0))


class _Recorder:
    """A pytest plugin that records the simulator's launches of santacpu's kernels (through the
    backend or directly): {(module, name, argument types)}."""

    def __init__(self):
        self.launches: set[str] = set()

    def pytest_sessionstart(self, session):
        import numba
        import numpy as np
        from numba.cuda.simulator.kernel import FakeCUDAKernel

        original = FakeCUDAKernel.__call__

        def describe(arg):
            if hasattr(arg, "_ary"):  # a simulator device array
                arg = arg._ary
            if isinstance(arg, np.ndarray):
                t = numba.typeof(arg)
                return ["array", str(t.dtype), t.ndim, t.layout]
            return ["scalar", str(numba.typeof(arg))]

        def call(kernel, *args):
            fn = kernel.fn
            if not kernel._device and fn.__module__.startswith("santacpu."):
                self.launches.add(json.dumps([fn.__module__, fn.__name__, [describe(a) for a in args]]))
            return original(kernel, *args)

        FakeCUDAKernel.__call__ = call


def record(path: Path) -> int:
    """Run the CUDA tests under the simulator, writing the launches seen to `path` (JSON)."""
    import pytest

    recorder = _Recorder()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *TESTS], plugins=[recorder])
    path.write_text(json.dumps(sorted(recorder.launches)))
    return int(code)


def _signature(types_described):
    from numba import types

    out = []
    for kind, *rest in types_described:
        if kind == "array":
            dtype, ndim, layout = rest
            out.append(types.Array(getattr(types, dtype), ndim, layout))
        else:
            out.append(getattr(types, rest[0]))
    return tuple(out)


def assemble(launches: list, name_filter: str) -> int:
    """Compile and assemble each recorded (kernel, types); print ptxas's resources."""
    import importlib
    import types as pytypes

    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(8, 0))  # no driver here
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        print("ptx_check: no ptxas on PATH (a CUDA toolkit's bin/)", file=sys.stderr)
        return 2
    by_kernel = defaultdict(list)
    for module, name, described in (json.loads(item) for item in launches):
        if name_filter in name:
            by_kernel[(module, name)].append(described)
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        for (module, name), signatures in sorted(by_kernel.items()):
            kernel = getattr(importlib.import_module(module), name)
            for i, described in enumerate(signatures):
                for cc in TARGETS:
                    label = f"{name} #{i + 1}/{len(signatures)} sm_{cc[0]}{cc[1]}"
                    bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")  # as the kernel's jit has them
                    try:
                        ptx, _ = cuda.compile_ptx(kernel.py_func, _signature(described), cc=cc, launch_bounds=bounds)
                    except Exception as error:  # noqa: BLE001 (reported, counted)
                        print(f"{label}: compile failed: {type(error).__name__}: {str(error).splitlines()[0]}")
                        failures += 1
                        continue
                    path = Path(folder) / f"{name}-{i}-sm{cc[0]}{cc[1]}.ptx"
                    path.write_text(ptx)
                    done = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path), "-o", str(path) + ".cubin"],
                                          capture_output=True, text=True)
                    lines = [line.split(": ", 1)[-1].strip() for line in done.stderr.splitlines()
                             if "registers" in line or "spill" in line]
                    print(f"{label}: ptxas exit {done.returncode}; {'; '.join(lines) or done.stderr.strip()}")
                    failures += done.returncode != 0
    print(f"ptx_check: {sum(len(s) for s in by_kernel.values())} kernel signatures, {failures} failures")
    return 1 if failures else 0


def _recorded(path: Path) -> list | None:
    """The launches the CUDA tests make under the simulator (a child process), written to path."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "tools.ptx_check", "--record", str(path)], cwd=ROOT, env=env)
    if done.returncode != 0 or not path.exists():
        print(f"ptx_check: the simulator run failed (exit {done.returncode})", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--record"]:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        return record(Path(argv[1]))
    kept = None
    if argv[:1] == ["--launches"]:
        kept, argv = Path(argv[1]), argv[2:]
    name_filter = argv[0] if argv else ""
    if kept is not None and kept.exists():
        launches = json.loads(kept.read_text())
    else:
        with tempfile.TemporaryDirectory() as folder:
            launches = _recorded(kept or Path(folder) / "launches.json")
        if launches is None:
            return 2
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    return assemble(launches, name_filter)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # no parser: print what it does, before it writes or runs anything
        sys.exit(print(__doc__.strip()))
    sys.exit(main(sys.argv[1:]))
