"""Every block-quantized Numba kernel (santacpu/backends/cpu/quant_kernels.py, reached through the format
table of kernels.py) against the NumPy reference
dequantize of santacpu/formats/blocks.py."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from santacpu.formats.blocks import FORMATS, PART_ORDER
from santacpu.backends.cpu import kernels

# The threaded paths are what these tests check: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

NAMES = list(FORMATS)


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def weights(rows, cols, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.02
    w[:, ::7] *= 4  # some larger input channels, so blocks differ in scale
    return w.astype(np.float32)


def test_the_format_table_has_every_format_in_its_part_order():
    assert set(kernels.FORMAT_KERNELS) == set(PART_ORDER) == set(FORMATS)
    for name, fmt in FORMATS.items():
        assert PART_ORDER[name] == tuple(fmt.part_specs(4, 64))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows", [1, 3, 5, 33])
@pytest.mark.parametrize("cols", [32, 96, 2048])
def test_matvec_matches_numpy(name, rows, cols):
    # Row counts cover whole and partial steps of ROWS rows; cols one block, a few, many.
    fmt = FORMATS[name]
    rng = np.random.default_rng(rows * 7 + cols)
    parts = fmt.quantize(weights(rows, cols, seed=rows + cols))
    x = rng.standard_normal(cols).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    out = np.empty(rows, np.float32)
    kernels.matvec(name, parts, x, bias, out)
    want = fmt.dequantize(parts).astype(np.float64) @ x + bias
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows,cols", [(1, 96), (5, 64), (33, 2048), (7, 224)])
@pytest.mark.parametrize("T", [2, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_few_matches_numpy(name, rows, cols, T, threads):
    # One weight pass for T tokens; rows cover a partial step, a step and a tail, and one row
    # split over 2 threads (a thread with no rows at all).
    fmt = FORMATS[name]
    rng = np.random.default_rng(rows * 11 + T)
    parts = fmt.quantize(weights(rows, cols, seed=rows + 3 * cols))
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    out = np.full((T, rows), np.nan, np.float32)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, previous))
    try:
        kernels.matmul_few(name, parts, x, bias, out)
    finally:
        numba.set_num_threads(previous)
    want = x.astype(np.float64) @ fmt.dequantize(parts).astype(np.float64).T + bias
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_rows_matches_numpy(name):
    fmt = FORMATS[name]
    w = weights(33, 96, seed=5)
    parts = fmt.quantize(w, importance=np.random.default_rng(0).random(96).astype(np.float32))
    want = fmt.dequantize(parts)
    first, last = 5, 22  # a middle range: 4 whole steps of ROWS rows and a partial one
    out = np.full((20, 96), np.nan, np.float32)  # a tile with room to spare
    kernels.dequantize_rows(name, parts, first, last, out)
    assert np.allclose(out[: last - first], want[first:last], rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.isnan(out[last - first :]).all()  # rows past the range untouched
    whole = np.empty_like(want)
    kernels.dequantize_rows(name, parts, 0, 33, whole)
    assert np.allclose(whole, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_read_only_parts():
    # Parts memory-mapped from a file are read-only arrays (a separate Numba specialisation).
    fmt = FORMATS["q4_0"]
    parts = fmt.quantize(weights(6, 64, seed=1))
    for p in parts.values():
        p.setflags(write=False)
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    out = np.empty(6, np.float32)
    kernels.matvec("q4_0", parts, x, np.zeros(6, np.float32), out)
    assert rel_err(out, fmt.dequantize(parts).astype(np.float64) @ x) < 1e-5
    tile = np.empty((6, 64), np.float32)
    kernels.dequantize_rows("q4_0", parts, 0, 6, tile)
    assert np.allclose(tile, fmt.dequantize(parts), rtol=0, atol=1e-7)


def test_wrappers_check_shapes():
    parts = FORMATS["q8_0"].quantize(weights(4, 64, seed=2))
    x, bias, out = np.zeros(64, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError):
        kernels.matvec("q8_0", parts, np.zeros(32, np.float32), bias, out)
    with pytest.raises(ValueError):
        kernels.matvec("q8_0", parts, x, bias, np.zeros(5, np.float32))
    with pytest.raises(ValueError):
        kernels.dequantize_rows("q8_0", parts, 2, 5, np.zeros((8, 64), np.float32))
    with pytest.raises(ValueError):
        kernels.dequantize_rows("q8_0", parts, 0, 4, np.zeros((2, 64), np.float32))
    with pytest.raises(ValueError, match="q8_0, q4_0"):
        kernels.matvec("q3_x", parts, x, bias, out)
