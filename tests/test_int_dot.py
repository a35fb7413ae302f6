"""The integer dot-product kernels (santacpu/backends/cpu/int_dot.py): the instruction choice, the layout of
the rounded activations, and every instruction set this CPU can run, each in a child process
that tells Numba to compile for a CPU without the wider ones. (The kernels' results against the
NumPy oracle, on this CPU's own choice, are in test_quant_kernels.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llvmlite import binding

from santacpu.backends.cpu import int_dot
from santacpu.network.reference import round_activations

# The threaded paths are what these tests check: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

ROOT = Path(__file__).resolve().parents[1]


def test_instruction_choice():
    assert int_dot.choose_isa({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}) == "vnni512"
    assert int_dot.choose_isa({"avx2", "avxvnni"}) == "vnni256"
    assert int_dot.choose_isa({"avx2", "fma"}) == "avx2"
    assert int_dot.choose_isa({"sse4.2", "avx"}) is None


def natural_order(xq, per_step):
    """xq [T, C] in the kernels' step order -> [T, C/32, 32] in natural order: a step's blocks are
    stored as their values 0..15, then their values 16..31; blocks after the last whole step as
    they are."""
    n_blocks = xq.shape[1] // 32
    natural = np.empty((xq.shape[0], n_blocks, 32), xq.dtype)
    for b in range(n_blocks):
        if b < n_blocks // per_step * per_step:
            first = (b // per_step) * per_step * 32 + (b % per_step) * 16
            second = first + 16 * per_step
        else:
            first, second = 32 * b, 32 * b + 16
        natural[:, b, :16] = xq[:, first : first + 16]
        natural[:, b, 16:] = xq[:, second : second + 16]
    return natural


def test_rounded_activations_layout():
    rng = np.random.default_rng(3)
    T, C = 2, 7 * 32  # whole vector steps and blocks after them
    x = rng.standard_normal((T, C)).astype(np.float32)
    x[1, 32:64] = 0  # an all-zero block: scale 0, codes 0
    xq = np.empty((T, C), np.int8)
    xfix = np.empty((T, C // 8), np.int32)
    xdx = np.empty((T, C // 8), np.float32)
    int_dot.quantize_activations(x, xq, xfix, xdx)
    blocks = x.reshape(T, -1, 32)
    amax = np.abs(blocks).max(axis=2)
    scale = amax / np.float32(127.0)
    codes = np.rint(blocks * np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax > 0)[..., None])
    natural = natural_order(xq, int_dot.BLOCKS_PER_STEP)
    assert np.array_equal(natural, codes)
    assert np.allclose(natural * scale[..., None], round_activations(x).reshape(T, -1, 32), rtol=0, atol=1e-6)
    if int_dot.QUADS:  # every lane of a block holds the block's fix
        lane_sums = np.repeat(codes.sum(axis=2), 4, axis=1)
    else:
        lane_sums = codes.reshape(T, -1, 2, 4, 4).sum(axis=(2, 4)).reshape(T, -1)  # lane g: values 4g.., 16+4g..
    assert np.array_equal(xfix, -8 * lane_sums)
    assert np.array_equal(xdx, np.repeat(scale, 4, axis=1))


def test_rounded_activations_layout_for_q8_0():
    rng = np.random.default_rng(4)
    T, C = 2, 5 * 32  # whole steps and, with 2 blocks a step, one block after them
    x = rng.standard_normal((T, C)).astype(np.float32)
    xq = np.empty((T, C), np.int16)
    xdx = np.empty((T, C // 4), np.float32)
    int_dot.quantize_activations_words(x, xq, xdx)
    blocks = x.reshape(T, -1, 32)
    amax = np.abs(blocks).max(axis=2)
    codes = np.rint(blocks * (np.float32(32767.0) / amax)[..., None])
    natural = natural_order(xq, int_dot.WORD_BLOCKS)
    assert np.array_equal(natural, codes)
    assert np.array_equal(xdx, np.repeat(amax / np.float32(32767.0), 8, axis=1))


# Run for a narrower instruction set by tests/test_token_invariance.py (test_narrower_instruction_sets_too).
CHILD = """
import numpy as np
from santacpu.formats.blocks import FORMATS
from santacpu.backends.cpu import int_dot, kernels
from santacpu.network.reference import round_activations
assert int_dot.ISA == {isa!r}, int_dot.ISA
rng = np.random.default_rng(0)
for name in int_dot.FORMATS:
    for rows, cols in [(9, 2048), (5, 224)]:
        parts = FORMATS[name].quantize(rng.standard_normal((rows, cols)).astype(np.float32))
        x = rng.standard_normal((3, cols)).astype(np.float32)
        bias = rng.standard_normal(rows).astype(np.float32)
        out = np.empty((3, rows), np.float32)
        kernels.matmul_few(name, parts, x, bias, out, integer=True)
        want = round_activations(x, int_dot.ACTIVATION_LEVELS[name]).astype(np.float64) @ FORMATS[name].dequantize(parts).T.astype(np.float64) + bias
        err = np.abs(out - want).max() / np.abs(want).max()
        assert err < 1e-5, (name, rows, cols, err)
from santacpu.backends.cpu import repack
from santacpu.backends.cpu.target import host_target
from santacpu.formats.blocks import QuantizedWeight
target = host_target()  # the backend's, chosen from the same features as int_dot's
assert target.name == {{"avx2": "avx2", "vnni256": "avx-vnni"}}[int_dot.ISA], target
parts = FORMATS["q4_0"].quantize(rng.standard_normal((13, 224)).astype(np.float32))
x = rng.standard_normal((11, 224)).astype(np.float32)
out = np.empty((11, 13), np.float32)
grouped = repack.group_rows(QuantizedWeight("q4_0", (13, 224), parts), target.rows_per_group)
repack.matmul(grouped, x, np.zeros(13, np.float32), out, target)
want = round_activations(x, 127).astype(np.float64) @ FORMATS["q4_0"].dequantize(parts).T.astype(np.float64)
assert np.abs(out - want).max() < 1e-5 * np.abs(want).max()
print("ok", int_dot.ISA)
"""


def features_without(prefixes: tuple[str, ...]) -> str:
    """This CPU's feature string with every feature starting with one of `prefixes` turned off."""
    features = binding.get_host_cpu_features()
    return ",".join(
        ("-" if name.startswith(prefixes) or not on else "+") + name for name, on in sorted(features.items())
    )


@pytest.mark.parametrize("T", [40, 41])
@pytest.mark.parametrize("name", int_dot.FORMATS)
def test_many_tokens_through_the_matrix_kernel(name, T):
    # Several 64-row panels and rows after the last 4-row tile; tokens in tiles of 3 and the 1 or 2
    # after them (4-row tiles of those tokens); 7 blocks a row: whole vector steps and a tail.
    # Each token equals its one-token product.
    from santacpu.formats.blocks import FORMATS
    from santacpu.backends.cpu import kernels

    if not kernels.has_integer_matmul(name):
        pytest.skip("no integer kernels on this CPU")
    rng = np.random.default_rng(6)
    rows, cols = 2 * int_dot.PANEL_ROWS + 6, 7 * 32
    parts = FORMATS[name].quantize(rng.standard_normal((rows, cols)).astype(np.float32))
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    out = np.full((T, rows), np.nan, np.float32)
    kernels.matmul_few(name, parts, x, bias, out)
    want = round_activations(x, int_dot.ACTIVATION_LEVELS[name]).astype(np.float64) @ FORMATS[name].dequantize(parts).T.astype(np.float64) + bias
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    for t in (0, T - 3, T - 2, T - 1):
        alone = np.empty(rows, np.float32)
        kernels.matvec(name, parts, x[t], bias, alone)
        assert np.array_equal(alone, out[t])


@pytest.mark.parametrize("name", int_dot.FORMATS)
def test_a_nan_in_x_makes_its_tokens_products_nan(name):
    # A NaN rounds to a finite integer: the block's scale carries it instead, so the token's
    # products are NaN as in float arithmetic (tests/test_repack.py checks the row groups).
    from santacpu.formats.blocks import FORMATS
    from santacpu.backends.cpu import kernels

    if not kernels.has_integer_matmul(name):
        pytest.skip("no integer kernels on this CPU")
    rng = np.random.default_rng(7)
    rows, cols = 9, 7 * 32
    parts = FORMATS[name].quantize(rng.standard_normal((rows, cols)).astype(np.float32))
    x = rng.standard_normal((5, cols)).astype(np.float32)
    x[3, 100] = np.nan
    bias = np.zeros(rows, np.float32)
    out = np.empty((5, rows), np.float32)
    kernels.matmul_few(name, parts, x, bias, out)
    assert np.isnan(out[3]).all() and np.isfinite(np.delete(out, 3, axis=0)).all()
    alone = np.empty(rows, np.float32)
    kernels.matvec(name, parts, x[3], bias, alone)
    assert np.isnan(alone).all()


def test_blas_is_single_threaded_only_inside_the_block():
    import threadpoolctl

    from santacpu.backends.cpu.backend import blas_single_threaded

    pools = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not pools.lib_controllers:
        pytest.skip("no BLAS thread pool that threadpoolctl knows in this process")
    with pools.limit(limits=2):
        with blas_single_threaded():
            assert [pool.num_threads for pool in pools.lib_controllers] == [1] * len(pools.lib_controllers)
        assert [pool.num_threads for pool in pools.lib_controllers] == [2] * len(pools.lib_controllers)


def test_many_token_forwards_quiet_blas_only_where_numba_does_the_products(tmp_path, monkeypatch):
    from helpers import tiny_checkpoint

    import santacpu
    from quantize.converter import convert

    expected = dict.fromkeys(("q4_0", "q4_m", "q8_0"), int_dot.ISA is not None)
    for qtype, quiet in expected.items():
        path = convert(tiny_checkpoint(), tmp_path / f"{qtype}.safetensors", qtype=qtype, upgrade_budget=0).out
        model = santacpu.load(path)
        assert model.engine.backend._products_in_numba(model.weights) == quiet, qtype
    full_precision = santacpu.load(tiny_checkpoint(), quant="none")  # fp32: BLAS does the products
    assert not full_precision.engine.backend._products_in_numba(full_precision.weights)
    monkeypatch.setenv("SANTACPU_INT_DOT", "0")  # read by load(): the float kernels, BLAS for prompts
    floats = santacpu.load(path)
    assert not floats.engine.backend._products_in_numba(floats.weights) and not floats.token_invariant
