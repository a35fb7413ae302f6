"""Split rows (santacpu.formats.split_rows): the embedding's most used rows at q8_0, the rest at
q6_0. The format against its formats' references, the CPU kernels against the oracle, the
policy that buys rows, and a converted file end to end (metadata, loading, damage)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rewrite_safetensors, tiny_checkpoint

import santacpu
from quantize.converter import convert, tensor_shapes
from quantize.policy import EMBEDDING_ROW_COUNTS, Policy, SizeTarget, embedding_upgrade_bytes, row_upgrade_bytes, stored_bytes
from santacpu import SantacpuError
from santacpu.backends.cpu import int_dot, kernels
from santacpu.backends.cpu.backend import BLAS_MIN_TOKENS, CpuBackend
from santacpu.formats.blocks import FORMATS
from santacpu.formats.quantized_file import read_metadata
from santacpu.formats.split_rows import SplitRowsWeight, split_rows, widened_to_q8_0
from santacpu.loading.checkpoint import open_checkpoint
from santacpu.loading.quantized import describe
from santacpu.network import reference

RAISED = [5, 3, 200, 299, 0]


@pytest.fixture(scope="module")
def weight_and_split():
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((300, 64)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, 64).astype(np.float32)
    return weight, importance, split_rows(weight, RAISED, "q8_0", "q6_0", importance)


def test_split_rows_hold_each_formats_rounding(weight_and_split):
    weight, importance, split = weight_and_split
    assert list(split.upgraded_rows) == sorted(RAISED) and len(split.rest_rows) == 300 - len(RAISED)
    values = split.dequantize()
    for qtype, rows in (("q8_0", split.upgraded_rows), ("q6_0", split.rest_rows)):
        fmt = FORMATS[qtype]
        np.testing.assert_array_equal(values[rows], fmt.dequantize(fmt.quantize(weight, importance))[rows])
    ids = np.array([299, 4, 3, 3, 150, 0])
    np.testing.assert_array_equal(split.dequantize_rows(ids), values[ids])
    assert split.nbytes == FORMATS["q8_0"].nbytes(5, 64) + FORMATS["q6_0"].nbytes(295, 64) + 4 * 5
    # One q8_0 matrix with the same values, for backends with one kernel per matrix.
    widened = widened_to_q8_0(split)
    assert widened.qtype == "q8_0" and np.array_equal(widened.dequantize(), values)
    assert np.array_equal(widened_to_q8_0(split.rest).dequantize(), split.rest.dequantize())


@pytest.mark.parametrize("tokens", [1, 3, BLAS_MIN_TOKENS + 2])
def test_cpu_products_and_lookups_match_the_oracle(weight_and_split, tokens):
    _, _, split = weight_and_split
    x = np.random.default_rng(tokens).standard_normal((tokens, 64)).astype(np.float32)
    backend = CpuBackend()
    if backend.target is None:
        pytest.skip("no integer kernels on this CPU")
    bound = kernels.bind(split, backend.target)  # as CpuBackend.prepare binds it: each part in row groups
    want = reference.linear(x, split, None, int_dot.ACTIVATION_LEVELS)  # rounds x as the integer kernels do
    np.testing.assert_allclose(backend.linear(x, bound, None), want, rtol=0, atol=1e-4 * np.abs(want).max())
    ids = np.array([0, 1, 299, 5, 42])
    np.testing.assert_array_equal(backend.embed(split, ids), split.dequantize()[ids])


def test_bad_split_rows_are_refused():
    rng = np.random.default_rng(0)
    good = split_rows(rng.standard_normal((40, 32)).astype(np.float32), [1, 2], "q8_0", "q6_0")
    with pytest.raises(SantacpuError, match="ascending"):
        SplitRowsWeight((40, 32), np.array([2, 1], np.int32), good.upgraded, good.rest)
    with pytest.raises(SantacpuError, match="ascending"):
        SplitRowsWeight((40, 32), np.array([1, 40], np.int32), good.upgraded, good.rest)
    with pytest.raises(SantacpuError, match="do not make"):
        SplitRowsWeight((41, 32), good.upgraded_rows, good.upgraded, good.rest)
    asymmetric = split_rows(rng.standard_normal((40, 32)).astype(np.float32), [1], "q8_0", "q4_m")
    with pytest.raises(SantacpuError, match="exactly"):
        widened_to_q8_0(asymmetric)


def test_the_budget_buys_rows_by_measured_cut_per_byte():
    shapes = tensor_shapes(open_checkpoint(tiny_checkpoint()))
    linear = [n for n in shapes if n.endswith("_weight") and n.startswith("h.") and len(shapes[n]) == 2]
    rows, cols = shapes["wte"]
    plain = Policy("q4_m", upgrade_budget=0.05).plan(shapes, {})
    total = sum(stored_bytes(plain.types[n], s) for n, s in shapes.items())
    weak = {n: {"q6_0": 1e-9, "q8_0": 2e-9} for n in linear}
    # Rows that cut much per byte are bought, as many as the budget allows, before weak upgrades.
    ladder = {k: 1e-3 * (1 + k / 4096) for k in EMBEDDING_ROW_COUNTS}
    plan = Policy("q4_m", upgrade_budget=0.05).plan(shapes, {**weak, "wte": ladder})
    assert plan.embedding_rows == max(k for k in EMBEDDING_ROW_COUNTS if row_upgrade_bytes("q6_0", cols, k) <= 0.05 * total)
    # Rows that cut nothing are not; nor are they without measurements, nor when --keep sets the embedding.
    assert Policy("q4_m", upgrade_budget=0.05).plan(shapes, {**weak, "wte": dict.fromkeys(ladder, 0.0)}).embedding_rows == 0
    assert Policy("q4_m", upgrade_budget=0.05).plan(shapes).embedding_rows == 0
    keep = Policy("q4_m", [("wte", "q8_0")], 0.05).plan(shapes, {**weak, "wte": ladder})
    assert keep.embedding_rows == 0 and keep.types["wte"] == "q8_0"
    assert Policy("q8_0", upgrade_budget=0.05).plan(shapes, {"wte": ladder}).embedding_rows == 0
    assert row_upgrade_bytes("q6_0", cols, 64) == 64 * (FORMATS["q8_0"].nbytes(1, cols) - FORMATS["q6_0"].nbytes(1, cols) + 4)
    assert rows > max(EMBEDDING_ROW_COUNTS)


def test_every_row_raised_is_the_whole_embedding_at_the_higher_type():
    # The level keyed by the vocabulary size raises the whole matrix: stored as one q8_0 matrix
    # (no split, no row ids) and costed so, bought when it is the best cut per byte that fits.
    shapes = tensor_shapes(open_checkpoint(tiny_checkpoint()))
    rows, cols = shapes["wte"]
    whole = stored_bytes("q8_0", shapes["wte"]) - stored_bytes("q6_0", shapes["wte"])
    assert embedding_upgrade_bytes("q6_0", shapes["wte"], rows) == whole
    assert embedding_upgrade_bytes("q6_0", shapes["wte"], 64) == row_upgrade_bytes("q6_0", cols, 64)
    ladder = {64: 1e-4, 4096: 1e-3, rows: 1e-1}
    base = Policy("q4_m", upgrade_budget=0.0).plan(shapes)
    least = sum(stored_bytes(base.types[n], s) for n, s in shapes.items() if len(s) == 2)
    weights = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 2)
    enough = Policy("q4_m", size_target=SizeTarget(bits_per_weight=8 * (least + whole) / weights)).plan(shapes, {"wte": ladder})
    assert enough.types["wte"] == "q8_0" and enough.embedding_rows == 0
    short = Policy("q4_m", size_target=SizeTarget(bits_per_weight=8 * (least + whole - 1) / weights)).plan(shapes, {"wte": ladder})
    assert short.types["wte"] == "q6_0" and short.embedding_rows == 4096


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    """The tiny checkpoint at q4_0 with its 64 "most used" rows raised (the order given here)."""
    most_used = np.arange(1000, 0, -1)  # ids 1000, 999, ...: raised rows 937..1000
    out = tmp_path_factory.mktemp("split") / "tiny-q4_0-rows.safetensors"
    return convert(tiny_checkpoint(), out, qtype="q4_0", upgrade_budget=0.05, upgrade_gains={"wte": {64: 1e-3}},
                   most_used_tokens=most_used).out


def test_a_converted_file_with_raised_rows(split_file):
    _, meta = read_metadata(split_file)
    entry = meta["tensors"]["wte"]
    assert meta["format_version"] == 2 and entry["type"] == "q6_0"
    assert entry["upgraded_rows"] == {"type": "q8_0", "count": 64, "parts": ["qs", "d"]}
    assert meta["quantization"]["embedding_rows_raised"] == 64
    assert "its 64 most used rows q8_0" in describe(split_file)
    model = santacpu.load(split_file, kv_cache="float32")
    wte = model.weights.wte
    assert isinstance(wte, SplitRowsWeight) and list(wte.upgraded_rows) == list(range(937, 1001))
    assert not wte.upgraded.parts["qs"].flags.owndata  # memory-mapped, as every other tensor
    assert model.token_invariant  # both parts on the integer kernels
    # The engine (lookups and the LM head on both parts) against the oracle, prompt and decode.
    ids = [1000, 5, 937, 936, 17, 999, 3, 3] * 3
    want = reference.forward(model.weights, ids, model.engine.backend.activation_rounding())
    scale = np.abs(want).max()
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=1e-4 * scale)
    cache = model.engine.new_cache()
    steps = [model.engine.forward(cache, ids[:2], all_logits=True)] + [model.engine.forward(cache, [t]) for t in ids[2:]]
    np.testing.assert_allclose(np.concatenate(steps), want, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("wte.rows"), "'wte.rows' is missing"),
    (lambda t: t.update({"wte.rows": t["wte.rows"][::-1].copy()}), "ascending"),
    (lambda t: t.update({"wte.rows": t["wte.rows"].astype(np.int64)}), "not int32"),
    (lambda t: t.pop("wte.upgraded.qs"), "'wte.upgraded.qs' is missing"),
])
def test_damaged_split_rows_give_one_clear_error(split_file, tmp_path, change, message):
    damaged = rewrite_safetensors(split_file, tmp_path / "damaged.safetensors", tensors=change)
    with pytest.raises(SantacpuError, match=message):
        santacpu.load(damaged)


def test_version_1_files_still_load(tmp_path):
    """Files from before split rows state version 1; they have none, and still load."""
    plain = convert(tiny_checkpoint(), tmp_path / "plain.safetensors", qtype="q8_0").out
    old = rewrite_safetensors(plain, tmp_path / "v1.safetensors", metadata=lambda m: m.update(format_version="1"))
    assert read_metadata(old)[1]["format_version"] == 1
    np.testing.assert_array_equal(santacpu.load(old).logits([1, 2, 3]), santacpu.load(plain).logits([1, 2, 3]))
