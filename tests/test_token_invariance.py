"""A token's results do not depend on the other tokens of its forward call, on every path of the
integer kernels this CPU can run: logits and K/V equal bit for bit whether tokens come one at a
time, a few at once or as a prompt, and prompt lookup reproduces plain greedy output after any
earlier requests (see tests/token_invariance.py for the checks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from llvmlite import binding
from test_int_dot import CHILD as PRODUCTS_CHILD, features_without
from token_invariance import REPO, check_calls_do_not_matter, check_lookup_after_other_requests, quantized_trained_model

import santacpu
from santacpu.backends.cpu import int_dot
from santacpu.backends.cpu.target import host_target

# The whole-model checks run on the backend's target (x86 or ARM64: tools/arm64_check.sh).
pytestmark = [pytest.mark.skipif(host_target() is None, reason="no integer kernels on this CPU"),
              pytest.mark.usefixtures("all_cores")]  # the threaded paths too (conftest)

# The instruction sets the integer kernels can be compiled for, and the CPU features to turn off
# so that a CPU with more compiles for exactly that one.
NARROWER = {"vnni256": ("avx512", "avx10", "evex512"), "avx2": ("avx512", "avx10", "evex512", "avxvnni")}
TARGET_NAMES = {"vnni256": "avx-vnni", "avx2": "avx2"}  # the row-group target (target.py) each compiles


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("invariance")
    return {qtype: quantized_trained_model(qtype, folder) for qtype in ("q4_0", "q4_m", "q8_0")}


@pytest.mark.parametrize("qtype", ["q4_0", "q4_m", "q8_0"])
def test_a_tokens_results_do_not_depend_on_its_call(models, qtype):
    check_calls_do_not_matter(santacpu.load(models[qtype]))


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_lookup_after_other_requests_gives_the_plain_output(models, qtype):
    check_lookup_after_other_requests(santacpu.load(models[qtype]), santacpu.load(models[qtype]))


def test_the_device_names_the_kernels_that_run(models, monkeypatch):
    # `complete --verbose`, `bench` and the server's log say it: which instruction set's kernels
    # a run used (a forced narrower target shows there), whether q8_0's layer matrices take int8 x
    # there (the 4-bit file's upgraded matrices are q8_0), or why the float kernels serve.
    model = santacpu.load(models["q4_0"])
    roles = host_target().int8_x_roles
    int8_x = any(getattr(layer, f"{role}_weight").qtype == "q8_0" for layer in model.weights.layers for role in roles)
    assert model.device == f"cpu: integer kernels for {host_target().name}" + (" (q8_0's layer matrices on int8 x)" if int8_x else "")
    with monkeypatch.context() as patch:
        patch.setenv("SANTACPU_INT_DOT", "0")
        assert santacpu.load(models["q4_0"]).device == "cpu: float kernels (integer kernels turned off: SANTACPU_INT_DOT=0)"


@pytest.mark.parametrize("isa", list(NARROWER))
def test_narrower_instruction_sets_too(isa, tmp_path):
    if int_dot.ISA is None:
        pytest.skip("x86 instruction sets only")
    # This CPU compiles the kernels for `isa` in child processes with the wider features turned
    # off, one Numba cache for both (the second loads the kernels the first compiled): first
    # every row-group format's products against the oracle (tests/test_int_dot.py's CHILD),
    # then this file's checks.
    host = {name for name, on in binding.get_host_cpu_features().items() if on}
    if int_dot.choose_isa({f for f in host if not f.startswith(NARROWER[isa])}) != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    if isa == int_dot.ISA:
        pytest.skip(f"{isa} is this CPU's own path: the tests above run it")
    env = dict(os.environ, NUMBA_CPU_FEATURES=features_without(NARROWER[isa]), NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_NAME", None)
    products = subprocess.run(
        [sys.executable, "-c", PRODUCTS_CHILD.format(isa=isa)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert products.returncode == 0, products.stderr[-3000:]
    assert products.stdout.split() == ["ok", isa]
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "token_invariance.py"), "q4_0", "q8_0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ok, ran, *devices = result.stdout.splitlines()  # the q8_0 file's line may add its int8 x
    assert (ok, ran) == ("ok", isa)
    assert {line.removesuffix(" (q8_0's layer matrices on int8 x)") for line in devices} == {f"cpu: integer kernels for {TARGET_NAMES[isa]}"}
