"""The integer kernels' instruction choice and x's rounding (santacpu/backends/cpu/int_dot.py), the code a
child process runs for each narrower instruction set this CPU can run (tests/test_token_invariance.py
starts it), and where BLAS's threads are quieted. (The row groups' products against the NumPy oracle
are in test_repack.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from llvmlite import binding

from santacpu.backends.cpu import int_dot

# The threaded paths are what these tests check: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

ROOT = Path(__file__).resolve().parents[1]


def test_instruction_choice():
    assert int_dot.choose_isa({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}) == "vnni512"
    assert int_dot.choose_isa({"avx2", "avxvnni"}) == "vnni256"
    assert int_dot.choose_isa({"avx2", "fma"}) == "avx2"
    assert int_dot.choose_isa({"sse4.2", "avx"}) is None


# Run for a narrower instruction set by tests/test_token_invariance.py (test_narrower_instruction_sets_too).
CHILD = """
import numpy as np
from santacpu.formats.blocks import FORMATS
from santacpu.backends.cpu import int_dot
from santacpu.network.reference import round_activations
assert int_dot.ISA == {isa!r}, int_dot.ISA
rng = np.random.default_rng(0)
from santacpu.backends.cpu import repack
from santacpu.backends.cpu.target import host_target
from santacpu.formats.blocks import QuantizedWeight
target = host_target()  # the backend's, chosen from the same features as int_dot's
assert target.name == {{"avx2": "avx2", "vnni256": "avx-vnni"}}[int_dot.ISA], target
for name in repack.FORMATS:  # every row-group format's tiles (x as each rounds it) against the oracle
    parts = FORMATS[name].quantize(rng.standard_normal((13, 224)).astype(np.float32))
    x = rng.standard_normal((11, 224)).astype(np.float32)
    out = np.empty((11, 13), np.float32)
    grouped = repack.group_rows(QuantizedWeight(name, (13, 224), parts), target.rows_per_group)
    repack.matmul(grouped, x, np.zeros(13, np.float32), out, target)
    want = round_activations(x, int_dot.ACTIVATION_LEVELS[name]).astype(np.float64) @ FORMATS[name].dequantize(parts).T.astype(np.float64)
    assert np.abs(out - want).max() < 1e-5 * np.abs(want).max(), name
print("ok", int_dot.ISA)
"""


def features_without(prefixes: tuple[str, ...]) -> str:
    """This CPU's feature string with every feature starting with one of `prefixes` turned off."""
    features = binding.get_host_cpu_features()
    return ",".join(
        ("-" if name.startswith(prefixes) or not on else "+") + name for name, on in sorted(features.items())
    )


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

    from santacpu.backends.cpu.target import host_target

    # Where the backend has a row-group target (x86 or ARM64), those run a prompt's products.
    expected = dict.fromkeys(("q4_0", "q4_m", "q8_0"), host_target() is not None)
    for qtype, quiet in expected.items():
        path = convert(tiny_checkpoint(), tmp_path / f"{qtype}.safetensors", qtype=qtype, upgrade_budget=0).out
        model = santacpu.load(path)
        assert model.engine.backend._products_in_numba(model.engine.weights) == quiet, qtype
    full_precision = santacpu.load(tiny_checkpoint(), quant="none")  # fp32: BLAS does the products
    assert not full_precision.engine.backend._products_in_numba(full_precision.engine.weights)
    monkeypatch.setenv("SANTACPU_INT_DOT", "0")  # read by load(): the float kernels, BLAS for prompts
    floats = santacpu.load(path)
    assert not floats.engine.backend._products_in_numba(floats.engine.weights) and not floats.token_invariant
