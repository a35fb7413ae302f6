"""The block formats' NumPy reference (santacpu/formats/blocks.py): layouts pinned by hand-made blocks,
sizes, error bounds, q4_m against q4_0, importance weighting, the compiled scale searches
(santacpu/formats/fits.py) against their NumPy forms, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from santacpu.formats import blocks as formats
from santacpu.formats.blocks import FORMATS, QK, get_format
from santacpu.errors import SantacpuError

NAMES = list(FORMATS)


def gaussian(rows, cols, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def heavy_tailed(rows, cols, kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "student_t":
        return (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32)
    w = rng.laplace(size=(rows, cols)) * 0.02  # Laplace with 0.1% of values blown up 20x
    hit = rng.choice(w.size, w.size // 1000, replace=False)
    w.flat[hit] *= 20
    return w.astype(np.float32)


def rmse(fmt, w, importance=None):
    return float(np.sqrt(((fmt.dequantize(fmt.quantize(w, importance)) - w) ** 2).mean()))


def weighted_error(fmt, w, importance, quantize_with):
    err = fmt.dequantize(fmt.quantize(w, quantize_with)) - w
    return float((err**2 * importance).sum())


# --- layout, sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_parts_match_specs_and_bits_per_weight(name):
    fmt = get_format(name)
    rows, cols = 3, 96
    parts = fmt.quantize(gaussian(rows, cols))
    specs = fmt.part_specs(rows, cols)
    assert list(parts) == list(specs)
    for part, (shape, dtype) in specs.items():
        assert parts[part].shape == shape and parts[part].dtype == dtype, part
        assert shape[0] == rows  # every part is sliceable by rows
    nbytes = fmt.nbytes(rows, cols)
    assert nbytes == sum(p.nbytes for p in parts.values())
    assert fmt.shape(parts) == (rows, cols)
    assert fmt.block_size == QK == 32
    per_row_extra = 64 if name == "q4_m" else 0  # q4_m's two float32 super-scales
    assert nbytes * 8 / (rows * cols) == pytest.approx(fmt.bits_per_weight + per_row_extra / cols)
    expected_bits = {"q8_0": 8.5, "q4_0": 4.5, "q4_m": 4.5, "q6_0": 6.5}[name]
    assert fmt.bits_per_weight == expected_bits


def test_q8_0_pinned_block():
    # max|x| = 127 gives d = 1 exactly, so the codes are the values themselves, in order.
    x = np.array([127, -127, 0, 1, -1, 2, -2, 3] + list(range(-48, 48, 4)), np.float32)[None, :]
    assert x.shape == (1, 32)
    parts = FORMATS["q8_0"].quantize(x)
    assert parts["d"].tolist() == [[1.0]]
    assert parts["qs"].tolist() == [x[0].astype(int).tolist()]


def test_q4_0_pinned_block():
    # Largest |x| is +8, so d = 8 / -8 = -1 and q = 8 - x. Codes: q[j] = j, q[j+16] = 15 - j.
    q = np.array(list(range(16)) + [15 - j for j in range(16)])
    x = (8 - q).astype(np.float32)[None, :]
    parts = FORMATS["q4_0"].quantize(x)
    assert parts["d"].tolist() == [[-1.0]]
    assert parts["d"].view(np.uint16).tolist() == [[0xBC00]]
    # byte j = q[j] | q[j+16] << 4 (ggml's nibble order): 0xF0, 0xE1, ..., 0x0F
    assert parts["qs"].tolist() == [[j | (15 - j) << 4 for j in range(16)]]
    assert parts["qs"][0, :3].tolist() == [0xF0, 0xE1, 0xD2]
    assert np.array_equal(FORMATS["q4_0"].dequantize(parts), x)


def test_q6_0_pinned_block():
    # Largest |x| is +32 (code 0), so d = 32 / -32 = -1 and q = 32 - x; codes q[j] = 7j mod 64.
    q = np.array([(7 * j) % 64 for j in range(32)])
    x = (32 - q).astype(np.float32)[None, :]
    parts = FORMATS["q6_0"].quantize(x)
    assert parts["d"].tolist() == [[-1.0]]
    ql = [(q[j] & 15) | (q[j + 16] & 15) << 4 for j in range(16)]
    qh = [(q[j] >> 4) | (q[j + 8] >> 4) << 2 | (q[j + 16] >> 4) << 4 | (q[j + 24] >> 4) << 6 for j in range(8)]
    assert parts["ql"].tolist() == [ql]
    assert parts["qh"].tolist() == [qh]
    # spot values, worked by hand: q[0]=0, q[16]=48 -> ql[0] = 0x00; q[1]=7, q[17]=55 -> 0x77;
    # qh[1]: q[1]=7 (hi 0), q[9]=63 (hi 3), q[17]=55 (hi 3), q[25]=47 (hi 2) -> 0b10_11_11_00
    assert parts["ql"][0, :2].tolist() == [0x00, 0x77]
    assert parts["qh"][0, 1] == 0b10111100
    assert np.array_equal(FORMATS["q6_0"].dequantize(parts), x)


def test_q4_m_pinned_block():
    # x = 0.5 * q - 2 exactly, q[j] = j, q[j+16] = 15 - j: scale 0.5, minimum -2, zero error.
    q = np.array(list(range(16)) + [15 - j for j in range(16)])
    x = (0.5 * q - 2).astype(np.float32)[None, :]
    parts = FORMATS["q4_m"].quantize(x)
    assert parts["sc"].tolist() == [[255]] and parts["mn"].tolist() == [[255]]  # the row's max
    assert parts["d"][0, 0] == pytest.approx(0.5 / 255, rel=1e-6)
    assert parts["dmin"][0, 0] == pytest.approx(2 / 255, rel=1e-6)
    assert parts["qs"].tolist() == [[j | (15 - j) << 4 for j in range(16)]]
    assert np.allclose(FORMATS["q4_m"].dequantize(parts), x, atol=1e-6)


# --- error bounds --------------------------------------------------------------------------------


def test_q8_0_error_at_most_half_a_step():
    w = heavy_tailed(16, 256, "student_t")
    fmt = FORMATS["q8_0"]
    parts = fmt.quantize(w)
    d = parts["d"].astype(np.float32)[..., None]  # [rows, blocks, 1]
    err = np.abs(fmt.dequantize(parts) - w).reshape(16, -1, QK)
    assert (err <= d / 2 * (1 + 1e-6) + 1e-12).all()
    assert (parts["qs"] != -128).all()


@pytest.mark.parametrize("name,levels", [("q4_0", 16), ("q6_0", 64)])
def test_symmetric_error_bounds(name, levels):
    # Half a step everywhere except at the top code, which may clip the side opposite the largest
    # |value| by at most one step.
    w = heavy_tailed(16, 256, "laplace")
    fmt = FORMATS[name]
    parts = fmt.quantize(w)
    d = parts["d"].astype(np.float32)[..., None]  # [rows, blocks, 1], signed
    deq = fmt.dequantize(parts).reshape(16, -1, QK)
    err = np.abs(deq - w.reshape(deq.shape))
    code = np.rint(deq / d) + levels // 2
    half_step = np.broadcast_to(np.abs(d) / 2 * (1 + 1e-5) + 1e-12, err.shape)
    top = code == levels - 1
    assert (err[~top] <= half_step[~top]).all()
    assert (err <= 2 * half_step).all()


def test_q4_m_codes_are_nearest_for_the_stored_scale_and_minimum():
    w = heavy_tailed(16, 256, "student_t")
    fmt = FORMATS["q4_m"]
    parts = fmt.quantize(w)
    scale = (parts["d"] * parts["sc"].astype(np.float32))[..., None]  # [rows, blocks, 1]
    offset = (parts["dmin"] * parts["mn"].astype(np.float32))[..., None]
    x = w.reshape(16, -1, QK)
    deq = fmt.dequantize(parts).reshape(x.shape)
    position = (x + offset) / scale  # in code units
    inside = (position >= 0) & (position <= 15)
    half_step = np.broadcast_to(scale / 2 * (1 + 1e-5) + 1e-9, x.shape)
    assert (np.abs(deq - x)[inside] <= half_step[inside]).all()
    # The fit may clip a block's extremes (a few % of Student-t values): those sit on the end codes.
    low, high = np.broadcast_to(-offset, x.shape), np.broadcast_to(15 * scale - offset, x.shape)
    assert np.allclose(deq[position < 0], low[position < 0], rtol=0, atol=1e-7)
    assert np.allclose(deq[position > 15], high[position > 15], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["gaussian", "student_t", "laplace"])
def test_q4_m_beats_q4_0(kind):
    w = gaussian(64, 1024) if kind == "gaussian" else heavy_tailed(64, 1024, kind)
    q4_0, q4_m = rmse(FORMATS["q4_0"], w), rmse(FORMATS["q4_m"], w)
    assert q4_m < 0.9 * q4_0, (q4_m, q4_0)


def test_error_ranking_on_gaussian_weights():
    # RMSE relative to the weights' spread: fewer bits, more error; q4_m well below q4_0.
    w = gaussian(32, 512)
    relative = {name: rmse(fmt, w) / float(w.std()) for name, fmt in FORMATS.items()}
    assert relative["q8_0"] < 0.007 < relative["q6_0"] < 0.025 < relative["q4_m"] < 0.075 < relative["q4_0"] < 0.095


# --- importance weighting ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_importance_lowers_the_weighted_error(name):
    rng = np.random.default_rng(7)
    w = gaussian(32, 512, seed=3)
    importance = rng.lognormal(0.0, 2.0, 512).astype(np.float32)  # very non-uniform channels
    plain = weighted_error(FORMATS[name], w, importance, None)
    weighted = weighted_error(FORMATS[name], w, importance, importance)
    assert weighted < 0.9 * plain, (weighted, plain)


def test_zero_importance_is_plain_quantization():
    w = gaussian(4, 64)
    for fmt in FORMATS.values():
        a, b = fmt.quantize(w), fmt.quantize(w, np.zeros(64, np.float32))
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_importance_is_checked():
    fmt = FORMATS["q4_m"]
    w = gaussian(2, 64)
    with pytest.raises(SantacpuError, match="importance"):
        fmt.quantize(w, np.ones(32, np.float32))
    with pytest.raises(SantacpuError, match="importance"):
        fmt.quantize(w, -np.ones(64, np.float32))


# --- rows are independent; inputs ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_independent_of_chunking(name, monkeypatch):
    w = heavy_tailed(37, 96, "laplace")
    importance = np.random.default_rng(1).random(96).astype(np.float32)
    fmt = FORMATS[name]
    whole = fmt.quantize(w, importance)
    monkeypatch.setattr(formats, "CHUNK_VALUES", 96 * 5)  # 5 rows a chunk: 8 chunks
    chunked = fmt.quantize(w, importance)
    alone = fmt.quantize(w[10:20], importance)
    for part in whole:
        assert np.array_equal(whole[part], chunked[part]), part
        assert np.array_equal(whole[part][10:20], alone[part]), part


SIGNED_ZERO_BLOCKS = [[0.0] * 32, [-0.0] * 32, [0.0] + [-0.0] * 31, [-0.0] + [0.0] * 31, [-0.0] * 31 + [0.0], [0.0] * 16 + [-0.0] * 16]


@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 96), (9, 256), (40, 1024)])
def test_compiled_scale_searches_give_the_numpy_searches_bits(rows, cols):
    # From 1 block to 1,280 (past one tile of fits.TILE); blocks of all-negative, all-positive,
    # constant and signed-zero values (NumPy's max and min keep the later of equal zeros, and the
    # sign of a zero scale is stored).
    rng = np.random.default_rng(rows * 1000 + cols)
    w = gaussian(rows, cols, seed=rows + cols)
    w[:, ::7] *= 4
    special = [*SIGNED_ZERO_BLOCKS, [0.5] * 32, list(-np.abs(w[0, :32])), list(np.abs(w[0, :32]))]
    for i, block in enumerate(special[: rows * cols // QK]):
        r, b = divmod(i, cols // QK)
        w[r, b * QK : (b + 1) * QK] = block
    importance = rng.random(cols).astype(np.float32) ** 4
    importance[:3] = 0
    xt = formats._blocks_t(w)
    wt = formats._blocks_t(np.broadcast_to(formats._check_importance(importance, cols), w.shape))
    assert [a.tobytes() for a in formats._block_max_min(xt)] == [a.tobytes() for a in formats._block_max_min(xt, compiled=False)]
    for weights in (wt, None):
        for qmin, qmax, signed_max in ((-127, 127, False), (-8, 7, True), (-32, 31, True)):
            compiled = formats._symmetric_scale(xt, weights, qmin, qmax, signed_max)
            reference = formats._symmetric_scale(xt, weights, qmin, qmax, signed_max, compiled=False)
            assert compiled.tobytes() == reference.tobytes()
        compiled = formats._q4m_fit(xt, weights)
        reference = formats._q4m_fit(xt, weights, compiled=False)
        assert [a.tobytes() for a in compiled] == [a.tobytes() for a in reference]
    assert np.signbit(formats._symmetric_scale(xt, wt, -8, 7, True)[:2]).tolist() != [False, False]  # signed zeros kept


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_blocks(name):
    # All-zero rows, constant blocks, an all-positive block (q4_m clamps its minimum to 0).
    w = np.zeros((3, 96), np.float32)
    w[1, :32] = 0.25
    w[1, 32:64] = -0.5
    w[2, :32] = np.linspace(0.1, 1.0, 32)
    w[2, 64:] = 1e-30
    fmt = FORMATS[name]
    deq = fmt.dequantize(fmt.quantize(w))
    assert np.isfinite(deq).all()
    assert (deq[0] == 0).all()
    assert np.allclose(deq[1, :64], w[1, :64], atol=1e-3)
    assert np.abs(deq[2, :32] - w[2, :32]).max() < 0.07


def test_any_float_dtype():
    w16 = gaussian(4, 64).astype(np.float16)
    w32 = w16.astype(np.float32)
    for fmt in FORMATS.values():
        want = fmt.quantize(w32)
        for w in (w16, w32.astype(np.float64)):
            got = fmt.quantize(w)
            assert all(np.array_equal(got[k], want[k]) for k in want)


def test_cols_must_be_a_multiple_of_32():
    for fmt in FORMATS.values():
        with pytest.raises(SantacpuError, match="multiple of 32"):
            fmt.quantize(np.zeros((4, 48), np.float32))
        with pytest.raises(SantacpuError, match="multiple of 32"):
            fmt.part_specs(4, 48)
    with pytest.raises(SantacpuError, match="2-D"):
        FORMATS["q8_0"].quantize(np.zeros(64, np.float32))


def test_non_finite_weights_are_refused():
    w = gaussian(4, 64)
    w[2, 5] = np.nan
    with pytest.raises(SantacpuError, match="non-finite"):
        FORMATS["q4_0"].quantize(w)


def test_parts_are_checked_on_dequantize():
    fmt = FORMATS["q4_0"]
    parts = fmt.quantize(gaussian(4, 64))
    with pytest.raises(SantacpuError, match="missing"):
        fmt.dequantize({"qs": parts["qs"]})
    with pytest.raises(SantacpuError, match="'d'"):
        fmt.dequantize({"qs": parts["qs"], "d": parts["d"].astype(np.float32)})


def test_get_format():
    assert get_format("q4_m") is FORMATS["q4_m"]
    assert set(FORMATS) == {"q8_0", "q4_0", "q4_m", "q6_0"}
    with pytest.raises(SantacpuError, match="q8_0, q4_0, q4_m, q6_0"):
        get_format("q5_k")
