"""Shared test helpers: tiny random checkpoints built once per test process (NumPy only)."""

from __future__ import annotations

import atexit
import mmap
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.random_checkpoint import write_checkpoint  # noqa: E402

import numpy as np  # noqa: E402

_root: Path | None = None
_built: dict[tuple, Path] = {}


def tiny_checkpoint(layout: str = "gpt_bigcode", dtype: str = "float32", multi_query: bool = True, seed: int = 0) -> Path:
    """A tiny checkpoint folder (config.json, model.safetensors, tokenizer.json); do not modify it:
    copy it first (`copy_checkpoint`) to make a broken variant."""
    global _root
    key = (layout, dtype, multi_query, seed)
    if key not in _built:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="santacpu-tests-"))
            atexit.register(shutil.rmtree, _root, True)
        name = f"{layout}-{dtype}-{'mq' if multi_query else 'mh'}-{seed}"
        _built[key] = write_checkpoint(_root / name, layout=layout, dtype=dtype, multi_query=multi_query, seed=seed)
    return _built[key]


def copy_checkpoint(dest: Path, **kind) -> Path:
    shutil.copytree(tiny_checkpoint(**kind), dest)
    return dest


def mmap_owner(array: np.ndarray) -> mmap.mmap | None:
    """The mmap at the root of `array`'s chain of buffer owners (views, as_strided's helper,
    memoryview), or None when the data is not memory-mapped."""
    owner = array
    while not isinstance(owner, mmap.mmap):
        if isinstance(owner, memoryview):
            owner = owner.obj
        elif getattr(owner, "base", None) is not None:
            owner = owner.base
        else:
            return None
    return owner
