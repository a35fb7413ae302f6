"""Row groups (santacpu/backends/cpu/repack.py): block-quantized weights interleaved 4, 8 or
16 rows at a time for the instruction sets' tiles (target.py). The layout, each target's kernel
this CPU can run against the NumPy oracle, against its own one-token results and against the
portable kernel's bits (plain LLVM IR, runnable everywhere), the backend's use of it, and the
mapped pages it gives back. (The ARM64 targets run under emulation: tools/arm64_check.sh.)"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import tiny_checkpoint
from numba import typeof

from santacpu.backends.cpu import kernels, repack
from santacpu.backends.cpu.backend import CpuBackend
from santacpu.backends.cpu.target import BY_NAME, INT8_X_ROLES, TARGETS, host_target, runnable_targets
from santacpu.bench.machine import mapped_file_rss_mb
from santacpu.formats.blocks import FORMATS, QuantizedWeight
from quantize.converter import convert
from santacpu.formats.split_rows import SplitRowsWeight
from santacpu.formats.safetensors_io import SafetensorsFile, release_mapped_pages, write_safetensors
from santacpu.network.reference import round_activations
from santacpu.network.weights import LayerWeights

# The threaded paths are what these tests check: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

REPO = Path(__file__).resolve().parent.parent
RUNNABLE = runnable_targets()
PORTABLE = BY_NAME["portable"]
TARGET_PARAMS = [
    pytest.param(target, id=target.name, marks=pytest.mark.skipif(target not in RUNNABLE, reason=f"this CPU cannot run {target.name}"))
    for target in TARGETS
]


def weight_of(qtype, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    return QuantizedWeight(qtype, (rows, cols), FORMATS[qtype].quantize(rng.standard_normal((rows, cols)).astype(np.float32)))


def per_row(grouped_part, n_blocks, n):
    """A per-block part [G, n_blocks * n] back to [n G, n_blocks]."""
    return grouped_part.reshape(-1, n_blocks, n).transpose(0, 2, 1).reshape(-1, n_blocks)


@pytest.mark.parametrize("n", [4, 8, 16])
def test_interleaved_layout(n):
    rows = n + 3  # a second group with 3 rows and n - 3 of padding
    weight = weight_of("q4_0", rows, 64)
    grouped = repack.group_rows(weight, n)
    qs, d = weight.parts["qs"], weight.parts["d"].view(np.uint16)
    assert [p.shape for p in grouped.parts] == [(2, 2 * 16 * n), (2, 2 * n)]
    # codes [group, block, vector v, row i, byte m] = the row's code byte 16 b + 4 v + m
    codes = grouped.parts[0].reshape(2, 2, 4, n, 4).transpose(0, 3, 1, 2, 4).reshape(2 * n, 2 * 16)
    scales = per_row(grouped.parts[1], 2, n)
    assert np.array_equal(codes[:rows], qs) and np.array_equal(scales[:rows], d)
    assert (codes[rows:] == 0x88).all() and (scales[rows:] == 0).all()  # value 0, scale 0
    assert grouped.shape == (rows, 64) and grouped.qtype == "q4_0" and grouped.nbytes == 2 * 2 * (16 * n + 2 * n)
    assert grouped.rows_per_group == n and grouped.format_id == FORMATS["q4_0"].format_id
    with pytest.raises(ValueError, match="q4_0, q4_m, q6_0, q8_0"):
        repack.group_rows(SimpleNamespace(qtype="q5_1", shape=(8, 32)), n)
    with pytest.raises(ValueError, match="4, 8 or 16 rows, not 12"):
        repack.group_rows(weight, 12)


@pytest.mark.parametrize("n", repack.GROUP_SIZES)
def test_interleaved_layout_of_q4_m(n):
    rows = n + 3
    weight = weight_of("q4_m", rows, 96)
    grouped = repack.group_rows(weight, n)
    codes, sc, mn, d, dmin = grouped.parts
    assert np.array_equal(codes.reshape(2, 3, 4, n, 4).transpose(0, 3, 1, 2, 4).reshape(2 * n, 48)[:rows], weight.parts["qs"])
    for part, name in ((sc, "sc"), (mn, "mn")):
        assert np.array_equal(per_row(part, 3, n)[:rows], weight.parts[name]) and (per_row(part, 3, n)[rows:] == 0).all()
    for part, name in ((d, "d"), (dmin, "dmin")):
        assert part.shape == (2 * n,) and np.array_equal(part[:rows], weight.parts[name][:, 0]) and (part[rows:] == 0).all()


# The instruction set whose int8-x tiles take each group size (4 rows: NEON's and portable's;
# their layout is the same for int8 and int16 x).
VNNI_FOR_ROWS = {4: BY_NAME["portable"].isa, 8: BY_NAME["avx-vnni"].isa, 16: BY_NAME["avx512-vnni"].isa}


@pytest.mark.parametrize("n", repack.GROUP_SIZES)
@pytest.mark.parametrize("int8_x", [False, True])
def test_interleaved_layout_of_q8_0(n, int8_x):
    rows = n + 3
    weight = weight_of("q8_0", rows, 64)
    grouped = repack.group_rows(weight, n, int8_x, VNNI_FOR_ROWS[n])
    codes, scales = grouped.parts
    assert codes.dtype == np.int8 and codes.shape == (2, 2 * 32 * n)
    # codes [group, block, piece p, row i, k] = the row's value 32 b + w p + k: w values of a row
    # together, 4 in 4-row groups (their tiles' 4-value dot products) and for VNNI's tiles of
    # int8 x (`vpdpbusd`), else 2 (int16 pairs)
    w = grouped.word_bytes
    assert w == (4 if n == 4 or int8_x else 2) and grouped.int8_x == int8_x and grouped.x_levels == (127 if int8_x else 32767)
    if int8_x and n > 4:  # AVX2's tiles take int8 x as int16: its pairs layout
        assert repack.group_rows(weight, n, True, BY_NAME["avx2"].isa).word_bytes == 2
    values = codes.reshape(2, 2, 32 // w, n, w).transpose(0, 3, 1, 2, 4).reshape(2 * n, 64)
    assert np.array_equal(values[:rows], weight.parts["qs"]) and (values[rows:] == 0).all()
    assert np.array_equal(per_row(scales, 2, n)[:rows], weight.parts["d"].view(np.uint16))


@pytest.mark.parametrize("n", repack.GROUP_SIZES)
def test_interleaved_layout_of_q6_0(n):
    rows = n + 3
    weight = weight_of("q6_0", rows, 64)
    codes, scales = repack.group_rows(weight, n).parts
    assert codes.shape == (2, 2 * 24 * n)  # 2-D as every format's codes: the kernels know q6_0 by its id
    codes = codes.reshape(2, 2, 24 * n)  # [group, block, byte]
    nibbles = codes[:, :, : 16 * n].reshape(2, 2, 4, n, 4).transpose(0, 3, 1, 2, 4).reshape(2 * n, 32)
    assert np.array_equal(nibbles[:rows], weight.parts["ql"])
    # high bits: byte 4 i + m of vector k (0: values in low nibbles, 1: in high ones), bits 2v..
    tops = codes[:, :, 16 * n :].reshape(2, 2, 2, n, 4)  # [group, block, k, row, m]
    shifts = np.array([0, 2, 4, 6]).reshape(1, 1, 1, 1, 1, 4)
    top = (tops[..., None] >> shifts) & 3  # [group, block, k, row, m, v]: value 16k + 4v + m
    values = top.transpose(0, 3, 1, 2, 5, 4).reshape(2 * n, 2, 32)  # [row, block, 16k + 4v + m]
    full = FORMATS["q6_0"].dequantize(weight.parts) / weight.parts["d"].astype(np.float32).repeat(32, axis=1) + 32
    assert np.array_equal(values[:rows], (np.rint(full).astype(np.int64) >> 4).reshape(rows, 2, 32))
    # the padding rows (3..n-1 of the second group) hold zeros
    assert (codes[1, :, : 16 * n].reshape(2, 4, n, 4)[:, :, 3:] == 0).all()
    assert (codes[1, :, 16 * n :].reshape(2, 2, n, 4)[:, :, 3:] == 0).all()
    assert np.array_equal(per_row(scales, 2, n)[:rows], weight.parts["d"].view(np.uint16))


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("kernel", repack.KERNEL_IDS)
@pytest.mark.parametrize("rows", [8, 21, 2 * repack.PANEL_ROWS + 5])
@pytest.mark.parametrize("T", [1, 2, 4, 11])
def test_products_match_the_oracle_and_each_tokens_own(target, kernel, rows, T):
    # Several panels, a last group with padding rows; tokens in whole tiles and the ones after
    # (tiles of 8, 4, 2, 1 tokens; i8mm's token pairs and a token without a partner). 7 blocks a
    # row. Each token's row equals its one-token product, and every target's results the
    # portable kernel's, bit for bit. Every format, and q8_0 against int8 x ("q8_0-int8x").
    qtype, int8_x = kernel.split("-")[0], kernel.endswith("int8x")
    cols = 7 * 32
    weight = weight_of(qtype, rows, cols, seed=rows + T)
    grouped = repack.group_rows(weight, target.rows_per_group, int8_x, target.isa)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    x[0, 32:64] = 0  # an all-zero block of x
    bias = rng.standard_normal(rows).astype(np.float32)
    out = np.full((T, rows), np.nan, np.float32)
    repack.matmul(grouped, x, bias, out, target)
    levels = 32767 if qtype == "q8_0" and not int8_x else 127  # int_dot's rounding of x for each format
    assert grouped.x_levels == levels
    want = round_activations(x, levels).astype(np.float64) @ FORMATS[qtype].dequantize(weight.parts).T.astype(np.float64) + bias
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    for t in range(T):
        alone = np.empty((1, rows), np.float32)
        repack.matmul(grouped, x[t : t + 1], bias, alone, target)
        assert np.array_equal(alone[0], out[t])
    if target != PORTABLE:
        portable = np.empty_like(out)
        repack.matmul(repack.group_rows(weight, PORTABLE.rows_per_group, int8_x, PORTABLE.isa), x, bias, portable, PORTABLE)
        assert np.array_equal(out, portable)


# x's rounded values at the edges: int16 ones where a split into bytes would carry or change sign
# (NEON's q8_0 path: x = 256 hi + lo); int8 ones where codes + 128 (the VNNI tiles of int8 x) meet
# the extremes. Each block's largest is the range's top, so x rounds to exactly these integers.
EDGE_X = {
    32767: [32767, -32767, 32640, 32639, -32640, -32641, 256, 255, -256, -255, 128, 127, -128, -129, 1, -1, 0,
            32512, -32513, 383, -384, 511, 12345, -23456, 200, -200, 32766, -32766, 129, -127, 254, -2],
    127: [127, -127, 126, -126, 1, -1, 0, 64, -64, 63, -63, 2, -2, 100, -100, 127, -127, 17, -17, 126, -1, 1, 0, 0,
          127, 127, -127, -127, 5, -5, 99, -99],
}


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("levels", sorted(EDGE_X))
def test_q8_0_at_the_edges_of_its_integers(target, levels):
    # Codes at -128 (a file may hold it; the quantizer writes -127..127) and 127 against x's
    # int16 (levels 32767) or int8 (127) extremes (EDGE_X). Every target's sums are exact: the
    # oracle in int64, and the portable kernel's bits.
    xs, int8_x = EDGE_X[levels], levels == 127
    rows, cols = 19, 96
    weight = weight_of("q8_0", rows, cols)
    codes = weight.parts["qs"]
    codes[:] = np.resize(np.array([-128, 127, -1, 0, 1, -128, -127, 64], np.int8), codes.size).reshape(codes.shape)
    codes[::3] = -128
    x = np.array([np.roll(xs, 5 * t) * (1 if t % 2 else -1) for t in range(5)], np.float32).repeat(3, axis=0).reshape(5, 3 * 32)
    x = np.ascontiguousarray(x[:, :cols])
    assert (np.abs(x.reshape(5, 3, 32)).max(axis=2) == levels).all()  # round_activations keeps each integer
    bias = np.zeros(rows, np.float32)
    out = np.full((5, rows), np.nan, np.float32)
    repack.matmul(repack.group_rows(weight, target.rows_per_group, int8_x, target.isa), x, bias, out, target)
    scales = weight.parts["d"].astype(np.float64)
    sums = np.einsum("tbj,rbj->trb", x.astype(np.int64).reshape(5, 3, 32), codes.astype(np.int64).reshape(rows, 3, 32))
    want = (sums * scales[None]).sum(axis=2)  # x's block scale is 1
    assert np.abs(out - want).max() <= 1e-6 * np.abs(want).max()
    portable = np.empty_like(out)
    repack.matmul(repack.group_rows(weight, PORTABLE.rows_per_group, int8_x, PORTABLE.isa), x, bias, portable, PORTABLE)
    assert np.array_equal(out, portable)


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("kernel", repack.KERNEL_IDS)
@pytest.mark.parametrize("T,poisoned", [(1, 0), (11, 9)])
def test_a_nan_in_x_makes_its_tokens_products_nan(target, kernel, T, poisoned):
    # As in float arithmetic (and the NumPy oracle): a NaN in a token's x makes every one of its
    # products NaN, not the finite value a NaN rounds to, which would hide damaged weights from
    # the engine's check. The other tokens' products stay as they were.
    qtype, int8_x = kernel.split("-")[0], kernel.endswith("int8x")
    rows, cols = 21, 3 * 32
    grouped = repack.group_rows(weight_of(qtype, rows, cols), target.rows_per_group, int8_x, target.isa)
    x = np.random.default_rng(T).standard_normal((T, cols)).astype(np.float32)
    bias = np.zeros(rows, np.float32)
    clean = np.empty((T, rows), np.float32)
    repack.matmul(grouped, x, bias, clean, target)
    x[poisoned, 40] = np.nan
    out = np.empty((T, rows), np.float32)
    repack.matmul(grouped, x, bias, out, target)
    assert np.isnan(out[poisoned]).all()
    others = np.arange(T) != poisoned
    assert np.array_equal(out[others], clean[others])


@pytest.mark.parametrize("n", repack.GROUP_SIZES)
@pytest.mark.parametrize("kernel", repack.KERNEL_IDS)
def test_rows_read_back_from_the_groups(kernel, n):
    qtype, int8_x = kernel.split("-")[0], kernel.endswith("int8x")
    weight = weight_of(qtype, 13, 96, seed=5)
    grouped = repack.group_rows(weight, n, int8_x, VNNI_FOR_ROWS[n] if int8_x else None)
    rows = np.array([12, 0, 5, 8, 5])
    assert np.array_equal(repack.dequantize_rows(grouped, rows), FORMATS[qtype].dequantize(weight.parts)[rows])
    with pytest.raises(ValueError, match="rows of a"):
        repack.dequantize_rows(grouped, np.array([13]))


def test_bad_shapes_and_instruction_sets_are_refused():
    with pytest.raises(ValueError, match="int8 x is a choice for q8_0 weights only"):
        repack.group_rows(weight_of("q4_0", 8, 64), 8, int8_x=True)
    if BY_NAME["avx2"] in RUNNABLE:  # a layout for VNNI's int8-x tiles on AVX2's: refused, not misread
        vnni_layout = repack.group_rows(weight_of("q8_0", 8, 64), 8, True, BY_NAME["avx-vnni"].isa)
        with pytest.raises(ValueError, match="laid out for another instruction set's tiles than avx2's"):
            repack.matmul(vnni_layout, np.ones((2, 64), np.float32), np.zeros(8, np.float32), np.empty((2, 8), np.float32), BY_NAME["avx2"])
    grouped = repack.group_rows(weight_of("q4_0", 8, 64), 8)
    with pytest.raises(ValueError, match="avx512-vnni cannot run 8-row groups"):  # its tiles hold 16 rows
        repack.matmul(grouped, np.ones((2, 64), np.float32), np.zeros(8, np.float32), np.empty((2, 8), np.float32), BY_NAME["avx512-vnni"])
    for target in TARGETS:  # code for instructions this CPU lacks is never compiled
        if target not in RUNNABLE:
            with pytest.raises(ValueError, match=f"cannot run the {target.name} kernels"):
                CpuBackend(target=target)
            group = repack.group_rows(weight_of("q4_0", 8, 64), target.rows_per_group)
            with pytest.raises(ValueError, match=f"{target.name} cannot run"):
                repack.matmul(group, np.ones((2, 64), np.float32), np.zeros(8, np.float32), np.empty((2, 8), np.float32), target)
    with pytest.raises(ValueError, match="row-group matmul"):
        repack.matmul(grouped, np.ones((2, 32), np.float32), np.zeros(8, np.float32), np.empty((2, 8), np.float32))
    with pytest.raises(ValueError, match="row-group matmul"):
        repack.matmul(grouped, np.ones((2, 64), np.float32), np.zeros(8, np.float32), np.empty((2, 16), np.float32)[:, ::2])


def test_mapped_pages_are_released_and_still_readable(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": np.arange(1 << 20, dtype=np.float32), "b": np.ones(1 << 20, np.float32)})
    file = SafetensorsFile(path)
    a = file.array("a")
    total = float(a.sum())  # reads every page in
    before = mapped_file_rss_mb([str(path)])
    release_mapped_pages(a)
    after = mapped_file_rss_mb([str(path)])
    if before is not None:
        assert after <= before - 3.5  # 4 MB of pages dropped (huge pages or not)
    assert float(a.sum()) == total  # faulted back in from the page cache
    heap = np.ones(1 << 20, np.float32)
    release_mapped_pages(heap)  # not a mapping: left alone (dropping it would zero it)
    assert heap.sum() == 1 << 20


def test_the_oracle_rounds_each_matrix_by_its_role():
    # reference.linear takes a (format, role) key before the format's own: how the oracle mirrors
    # a target whose q8_0 matrices of some roles round x to int8 (kernels.activation_rounding).
    from santacpu.network.reference import linear

    weight = weight_of("q8_0", 8, 64)
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    rounded = kernels.activation_rounding(BY_NAME["avx512-vnni"])
    assert rounded["q8_0"] == 32767 and rounded[("q8_0", "mlp_c_fc")] == 127 and ("q8_0", "lm_head") not in rounded
    dense = FORMATS["q8_0"].dequantize(weight.parts).T
    assert np.array_equal(linear(x, weight, None, rounded, "mlp_c_fc"), round_activations(x, 127) @ dense)
    assert np.array_equal(linear(x, weight, None, rounded, "lm_head"), round_activations(x, 32767) @ dense)
    assert kernels.activation_rounding(BY_NAME["avx2"]) == {q: 32767 if q == "q8_0" else 127 for q in repack.FORMATS}
    assert kernels.activation_rounding(None) == {}


def test_q8_0_on_int16_x_everywhere_when_asked(tmp_path, monkeypatch):
    # SANTACPU_Q8_0_X=int16: no q8_0 matrix rounds x to int8 whatever the target, so a VNNI CPU
    # gives the AVX2 kernels' bits (compared where both run) and the oracle needs no role keys.
    import santacpu
    from santacpu.model import Model
    from santacpu.network import reference

    path = convert(tiny_checkpoint(), tmp_path / "q8_0.safetensors", qtype="q8_0", upgrade_budget=0).out
    monkeypatch.setenv("SANTACPU_Q8_0_X", "int16")  # read by load()
    model = santacpu.load(path, kv_cache="float32")
    backend = model.engine.backend
    assert backend.int8_x_roles == frozenset() and "int8 x" not in model.device
    assert backend.activation_rounding() == kernels.activation_rounding(backend.target, frozenset())
    assert not any(isinstance(k, tuple) for k in backend.activation_rounding())
    ids = list(range(100, 140))
    got = model.logits(ids)
    want = reference.forward(model.weights, ids, backend.activation_rounding())
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    if BY_NAME["avx2"] in RUNNABLE:
        avx2 = Model(model.weights, model.tokenizer, CpuBackend(target=BY_NAME["avx2"]), kv_cache="float32")
        assert np.array_equal(avx2.logits(ids), got)


def test_int8_x_roles_name_layer_matrices():
    # The roles are LayerWeights' matrix fields less "_weight" (the backend's and the reference
    # forward's names for them): a renamed field must not quietly leave a matrix on int16 x.
    matrices = {f.name.removesuffix("_weight") for f in dataclasses.fields(LayerWeights) if f.name.endswith("_weight")}
    assert INT8_X_ROLES <= matrices - {"ln_1", "ln_2"}
    assert {t.name for t in TARGETS if t.int8_x_roles} == {"avx512-vnni", "avx-vnni"}  # where `vpdpbusd` pays


@pytest.mark.parametrize("qtype", repack.FORMATS)
def test_the_backend_groups_its_formats(qtype, tmp_path):
    import santacpu

    target = host_target() or PORTABLE  # as on every CPU with integer kernels
    path = convert(tiny_checkpoint(), tmp_path / "4-bit.safetensors", qtype=qtype, upgrade_budget=0.05).out
    model = santacpu.load(path, device="cpu")
    backend = CpuBackend(target=target)
    prepared = backend.prepare(model.weights)

    def grouped(linear) -> bool:
        return isinstance(linear, kernels.RowGroupLinear) and linear.target == target

    int8_x_seen = False
    for loaded, bound in zip(model.weights.layers, prepared.layers):
        for name in ("attn_c_attn_weight", "attn_c_proj_weight", "mlp_c_fc_weight", "mlp_c_proj_weight"):
            before, after = getattr(loaded, name), getattr(bound, name)
            assert grouped(after) == (before.qtype in repack.FORMATS)
            assert after.weight.qtype == before.qtype and after.shape == before.shape
            if grouped(after):  # q8_0's x as int8 in the target's chosen matrices only
                int8_x = before.qtype == "q8_0" and name.removesuffix("_weight") in target.int8_x_roles
                assert after.weight.int8_x == int8_x
                int8_x_seen |= int8_x
        assert np.array_equal(bound.ln_1_weight, loaded.ln_1_weight) and bound.ln_1_weight is not loaded.ln_1_weight
    said = backend.describe()  # `complete --verbose`, the bench's device row
    assert said.endswith(" (q8_0's layer matrices on int8 x)") == int8_x_seen, said
    assert int8_x_seen == (qtype == "q8_0" and bool(target.int8_x_roles)) or qtype != "q8_0"  # 4-bit files may hold q8_0 upgrades
    loaded_wte, bound_wte = model.weights.wte, prepared.wte
    split = isinstance(loaded_wte, SplitRowsWeight)
    pairs = zip((loaded_wte.upgraded, loaded_wte.rest), bound_wte.parts) if split else [(loaded_wte, bound_wte)]
    for before, after in pairs:
        assert grouped(after) == (before.qtype in repack.FORMATS)
    ids = np.array([0, 7, 5, 200, 7])
    assert np.array_equal(backend.embed(bound_wte, ids), backend.embed(loaded_wte, ids))  # the input lookup
    # Without integer kernels every matrix is bound where it is mapped, on the float kernels.
    floats = CpuBackend(integer_kernels=False).prepare(model.weights)
    for loaded, bound in zip(model.weights.layers, floats.layers):
        assert isinstance(bound.mlp_c_fc_weight, kernels.PackedLinear) and not bound.mlp_c_fc_weight.integer
        assert bound.mlp_c_fc_weight.weight is loaded.mlp_c_fc_weight and bound.ln_1_weight is loaded.ln_1_weight


# CPU models whose kernels CI's machines may not run: their defaults, plus the feature names
# santacpu's target choice reads (target.compile_features).
FOREIGN_X86 = {
    "alderlake": ("avx-vnni", "+avx,+avx2,+fma,+f16c,+avxvnni,+bmi2"),
    "znver4": ("avx512-vnni", "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,+evex512"),
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU models: an x86 machine compiles them")
@pytest.mark.parametrize("cpu", sorted(FOREIGN_X86))
def test_the_vnni_tiles_compile_for_cpus_this_one_may_not_be(cpu, tmp_path):
    # Compiled, never run (tools/kernel_asm.py): a VNNI tile's IR is checked on every x86 CI
    # machine, not only where its instructions run, and its products are the VNNI instructions.
    target, features = FOREIGN_X86[cpu]
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "kernel_asm.py"), "--dump", str(tmp_path), "--json", str(tmp_path / "counts.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [row for row in json.loads((tmp_path / "counts.json").read_text()) if row["target"] == target]
    assert {(row["format"], row["tokens"]) for row in rows} == {
        (name, tokens) for name in repack.KERNEL_IDS for tokens in (1, BY_NAME[target].widest_tile(name.split("-")[0]))
    }
    for row in rows:
        code = (tmp_path / f"{target}-{row['format']}-{row['tokens']}.s").read_text()
        if row["format"] != "q8_0":  # the 4- and 6-bit codes, and q8_0's against int8 x
            assert "vpdpbusd" in code
        elif target == "avx512-vnni":  # (compiled for Alder Lake, LLVM may turn it back into vpmaddwd + vpaddd)
            assert "vpdpwssd" in code
        assert ("%zmm" in code) == (target == "avx512-vnni")


def test_kernel_asm_compiles_the_tiles_for_the_parts_row_groups_have(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from kernel_asm import part_types

    for qtype in repack.FORMATS:
        grouped = repack.group_rows(weight_of(qtype, 8, 64), 8)
        assert [typeof(a) for a in part_types(qtype)] == [typeof(a) for a in grouped.parts], qtype
