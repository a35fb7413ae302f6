"""Shared fixtures. The repo root goes on sys.path so tests can import `tools` (NumPy-only parts).

The CUDA kernels run on Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM is set otherwise
(tools/gpu_check.sh sets it to 0 to run the same tests on a real GPU); Numba reads it at import.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# pytest-xdist's workers share the machine's cores (CI: two workers on two cores). A worker's Numba
# pool and NumPy's OpenBLAS would each take every core, and their threads spin waiting on threads
# the other worker has taken: one quality test took 37 s alone, 78 s beside a copy of itself with
# every thread and 36 s with one. So in a worker the kernels and BLAS run on the calling thread
# (`_one_thread_in_each_worker`), child processes get one BLAS thread, and the tests of the threaded
# paths themselves ask for every core (`all_cores`).
IN_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if IN_WORKER:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The quantization cache (first-use files, the calibrations `quantize` keeps) of this process and
# the ones it starts: a folder of its own, removed at exit, never the user's ~/.cache/santacpu.
# Tests that judge what the cache holds give themselves an empty one.
os.environ["SANTACPU_CACHE"] = tempfile.mkdtemp(prefix="santacpu-test-cache-")
atexit.register(shutil.rmtree, os.environ["SANTACPU_CACHE"], True)

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """`tiny_checkpoint(layout="gpt_bigcode", multi_query=True, seed=0, dtype="float32") -> folder`:
    a tiny random checkpoint from tools.random_checkpoint, written once per session and shared."""
    from helpers import tiny_checkpoint as build

    def get(layout: str = "gpt_bigcode", *, multi_query: bool = True, seed: int = 0, dtype: str = "float32") -> Path:
        return build(layout=layout, dtype=dtype, multi_query=multi_query, seed=seed)

    return get


@pytest.fixture(scope="session")
def trained_q8(tmp_path_factory) -> Path:
    """The trained fixture (tests/fixtures/trained_tiny) converted to q8_0, once per session."""
    import warnings

    from quantize.converter import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture has no tokenizer.json: the bundled one is used
        return convert(Path(__file__).parent / "fixtures" / "trained_tiny",
                       tmp_path_factory.mktemp("trained") / "trained-q8_0.safetensors", qtype="q8_0").out


@pytest.fixture(scope="session", autouse=True)
def _one_thread_in_each_worker():
    if not IN_WORKER:
        yield
        return
    import numba
    import threadpoolctl

    numba.set_num_threads(1)  # this thread's (Numba's setting is per thread: server threads keep theirs)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture
def all_cores():
    """The test's Numba kernels on every thread Numba has (an xdist worker's default is one)."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    yield
    numba.set_num_threads(previous)
