"""Shared fixtures. The repo root goes on sys.path so tests can import `tools` (NumPy-only parts).

The CUDA kernels run on Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM is set otherwise
(tools/gpu_check.sh sets it to 0 to run the same tests on a real GPU); Numba reads it at import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

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
