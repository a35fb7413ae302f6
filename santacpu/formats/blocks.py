"""Quantized block formats: how a float weight matrix becomes a few small integer arrays ("parts")
and back. This module is the NumPy reference (quantize and dequantize; the block-scale searches
run compiled, from fits.py, their NumPy forms here the reference) and owns the formats' facts
(QK, each format's parts in the kernels' argument order, `PART_ORDER`) and `QuantizedWeight`, a
weight held as its parts; the Numba kernels that read the same parts at run time live in
`santacpu/backends/cpu/quant_kernels.py` and are tested against `dequantize` here.

Shared layout (every format): a weight is [rows, cols] (rows = outputs, cols = inputs); blocks of
QK = 32 consecutive values run along cols, so cols must be a multiple of 32. The parts are stored
structure-of-arrays, each with first dimension `rows`, so any row range is a plain slice of every
part (parallel rows, dequantized tiles for BLAS). Float16 parts are IEEE half.

| format | parts, each [rows, ...]                                 | bits/weight     | x =                    |
|--------|---------------------------------------------------------|-----------------|------------------------|
| q8_0   | qs int8 [cols], d f16 [cols/32]                         | 8.5             | d * q                  |
| q4_0   | qs u8 [cols/2], d f16 [cols/32]                         | 4.5             | d * (q - 8)            |
| q4_m   | qs u8 [cols/2], sc, mn u8 [cols/32], d, dmin f32 [1]    | 4.5 + 64 a row  | (d*sc) * q - dmin*mn   |
| q6_0   | ql u8 [cols/2], qh u8 [cols/4], d f16 [cols/32]         | 6.5             | d * (q - 32)           |

Each format's class below carries its full layout table (nibble and bit order included).

Importance weighting (llama.cpp's imatrix, AWQ's idea): `quantize(weight, importance)` with
importance [cols] >= 0 per input channel (e.g. the mean squared activation it multiplies) picks
each block's scale (and min) to minimise sum_j importance_j * (w_j - deq_j)^2 instead of the
plain error, by a small search over candidate scales with a least-squares refit for each.

Rounding is np.rint (half to even) throughout; the integer codes are always chosen against the
scale that is actually stored (the fp16- or code-rounded one), so the stored block is the best one
for its stored scale.

May import: numpy, `santacpu.errors`, `santacpu.formats.fits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import SantacpuError


def _fits():
    """The compiled searches (fits.py), imported on first use: Numba stays unloaded where only the
    formats' facts are read (the command line's options and help)."""
    from . import fits

    return fits

QK = 32  # values per block, every format
# Rows are quantized in chunks of about this many values: bounds the temporaries (a few float32
# copies of a chunk) and keeps them in cache.
CHUNK_VALUES = 1 << 18


def _check_weight(weight: np.ndarray) -> tuple[int, int]:
    if weight.ndim != 2:
        raise SantacpuError(f"quantize expects a 2-D weight [rows, cols], got shape {weight.shape}")
    rows, cols = weight.shape
    if cols % QK or cols == 0:
        raise SantacpuError(f"quantize needs cols (the input dimension) to be a multiple of {QK}, got {cols}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise SantacpuError(f"quantize expects a float weight, got dtype {weight.dtype}")
    return rows, cols


def _check_importance(importance: np.ndarray | None, cols: int) -> np.ndarray | None:
    """importance [cols] -> float32 weights normalised to mean 1, with a small floor so a block of
    all-zero importance still gets a sensible (plain-error) fit; None for no weighting."""
    if importance is None:
        return None
    imp = np.asarray(importance, dtype=np.float64)
    if imp.shape != (cols,):
        raise SantacpuError(f"importance must have shape ({cols},) (one value per input column), got {imp.shape}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise SantacpuError("importance must be finite and >= 0")
    mean = imp.mean()
    if mean == 0:
        return None
    return (imp / mean + 1e-6).astype(np.float32)


def _blocks_t(x: np.ndarray) -> np.ndarray:
    """[n, cols] float32 -> [32, n*cols/32]: one block per column, so per-block reductions are
    sums of 32 contiguous vectors (fast) rather than 32-long rows."""
    return np.ascontiguousarray(x.reshape(-1, QK).T)


def _from_blocks_t(qt: np.ndarray, n: int) -> np.ndarray:
    """Inverse of _blocks_t: [32, n*nb] -> [n, nb, 32]."""
    return np.ascontiguousarray(qt.T).reshape(n, -1, QK)


def _round_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    np.rint(v, out=v)
    # One np.clip: the same values as np.maximum then np.minimum (v is finite), at a third of their time.
    return np.clip(v, np.float32(lo), np.float32(hi), out=v)


def _block_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[32, N] float32 x2 -> [N] float32: each block's sum of a*b, k = 0..31 in order, each product
    rounded before it is added (never fused): the order fits.py keeps, on every CPU (NumPy's einsum
    gives these bits on x86, but may fuse on ARM)."""
    total = np.zeros(a.shape[1], np.float32)  # from +0, as einsum and fits.py start (the sign of a zero sum)
    for k in range(a.shape[0]):
        total += a[k] * b[k]
    return total


def _block_max_min(xt: np.ndarray, compiled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """[32, N] float32 -> each block's (max, min) [N], of equal values (+0 and -0) the later one:
    spelled out, as fits.py does it (NumPy's reductions give zeros the sign each CPU's max and min
    instructions give). compiled=False: the NumPy form."""
    if compiled:
        hi, lo = np.empty(xt.shape[1], np.float32), np.empty(xt.shape[1], np.float32)
        _fits().block_max_min(xt, hi, lo)
        return hi, lo
    hi, lo = xt[0].copy(), xt[0].copy()
    for k in range(1, xt.shape[0]):
        hi = np.where(xt[k] >= hi, xt[k], hi)
        lo = np.where(xt[k] <= lo, xt[k], lo)
    return hi, lo


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [n, nb, 32] in 0..15 -> [n, nb*16] uint8: byte j of a block = q[j] | q[j+16] << 4."""
    q = q.astype(np.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(q.shape[0], -1)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, nb*16] uint8 -> [n, nb, 32] uint8 in 0..15 (inverse of _pack_nibbles)."""
    b = qs.reshape(qs.shape[0], -1, 16)
    return np.concatenate([b & 15, b >> 4], axis=-1)


class BlockFormat:
    """One quantized block format; instances live in FORMATS. Subclasses set `name`, `format_id`,
    `bits_per_weight`, `_parts` (name -> (per-row size as a function of cols, dtype)), the facts
    below where they differ, and implement `_quantize_rows` and `_dequantize_rows`. Kernels and
    tools read these facts here, never spell them again."""

    name: str
    format_id: int  # the format's number: the kernels' compile-time switch (WEIGHT_FORMAT_IDS)
    block_size: int = QK
    bits_per_weight: float
    _parts: ClassVar[dict[str, tuple]]
    values_per_code_byte: int = 2  # of the first part (the codes)
    # Symmetric: x = d * (q - code_offset), one fp16 scale d per block, no minimum (a row of one
    # format can be joined to a row of another by its scale alone: split embedding rows).
    symmetric: bool = True
    code_offset: int = 0

    def part_specs(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Part name -> (shape, dtype) for a [rows, cols] weight, in the kernels' argument order."""
        if cols % QK:
            raise SantacpuError(f"{self.name} needs cols to be a multiple of {QK}, got {cols}")
        return {name: ((rows, per_row(cols)), np.dtype(dtype)) for name, (per_row, dtype) in self._parts.items()}

    def nbytes(self, rows: int, cols: int) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.part_specs(rows, cols).values())

    def shape(self, parts: dict[str, np.ndarray]) -> tuple[int, int]:
        """The [rows, cols] of the weight these parts encode; checks every part's shape and dtype."""
        missing = set(self._parts) - set(parts)
        if missing:
            raise SantacpuError(f"{self.name} parts missing: {sorted(missing)}")
        first = parts[next(iter(self._parts))]  # the codes: cols / values_per_byte bytes a row
        if first.ndim != 2:
            raise SantacpuError(f"{self.name} parts must be 2-D [rows, ...], got shape {first.shape}")
        rows, cols = first.shape[0], first.shape[1] * self.values_per_code_byte
        for name, (shape, dtype) in self.part_specs(rows, cols).items():
            got = parts[name]
            if got.shape != shape or got.dtype != dtype:
                raise SantacpuError(
                    f"{self.name} part {name!r}: expected {dtype} {shape}, got {got.dtype} {tuple(got.shape)}"
                )
        return rows, cols

    def quantize(self, weight: np.ndarray, importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """weight [rows, cols] (any float dtype) -> parts; importance [cols] >= 0 optional (see
        the module docstring). Works through row chunks, so memory stays ~ the output."""
        rows, cols = _check_weight(weight)
        imp = _check_importance(importance, cols)
        parts = {name: np.empty(shape, dtype) for name, (shape, dtype) in self.part_specs(rows, cols).items()}
        step = max(1, CHUNK_VALUES // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = np.asarray(weight[r0:r1], dtype=np.float32)
            if not np.isfinite(x).all():
                raise SantacpuError(f"cannot quantize non-finite weights (rows {r0}..{r1 - 1})")
            wt = None  # importance in the same [32, blocks] layout as _blocks_t(x)
            if imp is not None:
                wt = _blocks_t(np.broadcast_to(imp, (r1 - r0, cols)))
            for name, value in self._quantize_rows(x, wt).items():
                parts[name][r0:r1] = value
        return parts

    def dequantize(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """parts -> float32 [rows, cols], in the same float32 arithmetic as the kernels."""
        rows, cols = self.shape(parts)
        out = np.empty((rows, cols), np.float32)
        step = max(1, CHUNK_VALUES // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[r0:r1] = self._dequantize_rows({k: v[r0:r1] for k, v in parts.items()}).reshape(r1 - r0, cols)
        return out

    def _quantize_rows(self, x: np.ndarray, wt: np.ndarray | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _dequantize_rows(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<BlockFormat {self.name}: {self.bits_per_weight} bits/weight>"


# --- symmetric formats: x = d * (q - offset), one fp16 scale per block -------------------------


def _symmetric_scale(xt: np.ndarray, wt: np.ndarray | None, qmin: int, qmax: int, signed_max: bool,
                     compiled: bool = True) -> np.ndarray:
    """Per-block scale d [N] (float32, before fp16 rounding) for blocks xt [32, N], codes qmin..qmax.

    Without weights: the max-abs rule. signed_max (q4_0/q6_0, ggml): m = the value of largest |x|
    with its sign, d = m / qmin, so m lands exactly on the extra negative code and the other sign
    gets qmax. Otherwise (q8_0): d = max|x| / qmax.

    With weights wt [32, N] (ggml's make_qx_quants): try the max-abs scale stretched by
    (n + 0.1*i)/n for i in -9..9 (n = the code the max lands on); for each, round, refit the scale
    by weighted least squares (d = sum w x q / sum w q^2) and keep the refit with the lowest
    weighted error (equivalently the highest (sum w x q)^2 / sum w q^2); then two more
    round-and-refit passes from the winner. The search runs compiled (fits.py, the same bits);
    compiled=False runs the NumPy below, its reference.
    """
    if wt is not None and compiled:
        out = np.empty(xt.shape[1], np.float32)
        _fits().symmetric_scale_weighted(xt, wt, qmin, qmax, signed_max, out)
        return out
    hi, lo = _block_max_min(xt, compiled)
    if signed_max:
        m = np.where(hi >= -lo, hi, lo)
        n = -qmin
        base = m / np.float32(qmin)
    else:
        m = np.where(hi > -lo, hi, -lo)  # of equals, -lo
        n = qmax
        base = m / np.float32(qmax)
    if wt is None:
        return base.astype(np.float32)

    inv = np.divide(1.0, base, out=np.zeros_like(base), where=base != 0)
    best_score = np.full(base.shape, -np.inf)
    best_d = base.astype(np.float64)
    q = np.empty_like(xt)
    wq = np.empty_like(xt)

    def consider(iscale):
        np.multiply(xt, iscale.astype(np.float32), out=q)
        _round_clip(q, qmin, qmax)
        np.multiply(wt, q, out=wq)
        sxq = _block_dots(wq, xt).astype(np.float64)
        sqq = _block_dots(wq, q).astype(np.float64)
        ok = sqq > 0
        score = np.where(ok, sxq * sxq / np.where(ok, sqq, 1.0), -np.inf)
        better = score > best_score
        best_score[better] = score[better]
        best_d[better] = sxq[better] / sqq[better]

    for i in range(-9, 10):
        consider(inv * ((n + 0.1 * i) / n))
    for _ in range(2):
        consider(np.divide(1.0, best_d, out=np.zeros_like(best_d), where=best_d != 0))
    return best_d.astype(np.float32)


def _symmetric_codes(xt: np.ndarray, d16: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Codes qmin..qmax [32, N] for blocks xt against the stored fp16 scales d16 [N]."""
    d = d16.astype(np.float32)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    return _round_clip(xt * inv, qmin, qmax)


def _fp16_scale(d: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # (an overflow is the error below, said once)
        d16 = d.astype(np.float16)
    if not np.isfinite(d16).all():
        raise SantacpuError("a block scale overflows float16 (weights larger than ~8e6 in magnitude)")
    return d16


class Q8_0(BlockFormat):
    """q8_0: 8-bit symmetric, one fp16 scale per block of 32 (ggml's Q8_0, split into two arrays).

    | part | dtype   | shape            | per block    |
    |------|---------|------------------|--------------|
    | qs   | int8    | [rows, cols]     | 32 bytes: q[0..31], in order |
    | d    | float16 | [rows, cols/32]  | 2 bytes      |

    x[j] = d * q[j], q in -127..127 (-128 unused). 34 bytes per 32 values = 8.5 bits/weight.
    Quantize (ggml's reference): d = max|x| / 127, q = round(x / d), with d rounded to fp16 first
    (so |x - d*q| <= d/2 for every value). With importance: d searched (see _symmetric_scale).
    """

    name = "q8_0"
    format_id = 2
    bits_per_weight = 8.5
    values_per_code_byte = 1
    _parts: ClassVar[dict] = {"qs": (lambda c: c, np.int8), "d": (lambda c: c // QK, np.float16)}

    def _quantize_rows(self, x, wt):
        n, cols = x.shape
        xt = _blocks_t(x)
        d16 = _fp16_scale(_symmetric_scale(xt, wt, -127, 127, signed_max=False))
        q = _symmetric_codes(xt, d16, -127, 127)
        return {"qs": _from_blocks_t(q.astype(np.int8), n).reshape(n, cols), "d": d16.reshape(n, -1)}

    def _dequantize_rows(self, parts):
        n = parts["qs"].shape[0]
        q = parts["qs"].reshape(n, -1, QK).astype(np.float32)
        return parts["d"].astype(np.float32)[..., None] * q


class Q4_0(BlockFormat):
    """q4_0: 4-bit symmetric, one fp16 scale per block of 32 (ggml's Q4_0, split into two arrays).

    | part | dtype   | shape            | per block                                  |
    |------|---------|------------------|--------------------------------------------|
    | qs   | uint8   | [rows, cols/2]   | 16 bytes: byte j = q[j] | q[j+16] << 4      |
    | d    | float16 | [rows, cols/32]  | 2 bytes                                    |

    Nibble order (ggml's): byte j (j = 0..15) holds value j in its low nibble and value j+16 in
    its high nibble. x[j] = d * (q[j] - 8), q in 0..15. 18 bytes per 32 values = 4.5 bits/weight.
    Quantize (ggml's quantize_row_q4_0_ref): m = the value of largest |x| with its sign,
    d = m / -8, q = clamp(round(x / d) + 8, 0, 15) with d rounded to fp16 first. With importance:
    d searched (see _symmetric_scale).
    """

    name = "q4_0"
    format_id = 3
    bits_per_weight = 4.5
    code_offset = 8
    _parts: ClassVar[dict] = {"qs": (lambda c: c // 2, np.uint8), "d": (lambda c: c // QK, np.float16)}

    def _quantize_rows(self, x, wt):
        n = x.shape[0]
        xt = _blocks_t(x)
        d16 = _fp16_scale(_symmetric_scale(xt, wt, -8, 7, signed_max=True))
        q = _symmetric_codes(xt, d16, -self.code_offset, self.code_offset - 1) + self.code_offset
        return {"qs": _pack_nibbles(_from_blocks_t(q, n)), "d": d16.reshape(n, -1)}

    def _dequantize_rows(self, parts):
        q = _unpack_nibbles(parts["qs"]).astype(np.float32) - np.float32(self.code_offset)
        return parts["d"].astype(np.float32)[..., None] * q


class Q6_0(BlockFormat):
    """q6_0: 6-bit symmetric, one fp16 scale per block of 32 (for sensitive tensors such as the
    tied embedding / LM head: the role llama.cpp gives Q6_K).

    | part | dtype   | shape            | per block                                                   |
    |------|---------|------------------|-------------------------------------------------------------|
    | ql   | uint8   | [rows, cols/2]   | 16 bytes, low 4 bits: byte j = lo(q[j]) + lo(q[j+16]) * 16  |
    | qh   | uint8   | [rows, cols/4]   | 8 bytes, high 2 bits: byte j = hi(q[j]) + hi(q[j+8]) * 4    |
    |      |         |                  |   + hi(q[j+16]) * 16 + hi(q[j+24]) * 64                     |
    | d    | float16 | [rows, cols/32]  | 2 bytes                                                     |

    lo(q) = q & 15, hi(q) = q >> 4; j = 0..15 in ql (the q4_0 nibble order), j = 0..7 in qh, so
    qh byte j holds the high bits of values j, j+8, j+16, j+24 at bits 0-1, 2-3, 4-5, 6-7.
    x[j] = d * (q[j] - 32), q in 0..63. 26 bytes per 32 values = 6.5 bits/weight.
    Quantize: max-abs like q4_0 (d = m / -32, d rounded to fp16 first); with importance: d
    searched (see _symmetric_scale).
    """

    name = "q6_0"
    format_id = 4
    bits_per_weight = 6.5
    code_offset = 32
    _parts: ClassVar[dict] = {
        "ql": (lambda c: c // 2, np.uint8),
        "qh": (lambda c: c // 4, np.uint8),
        "d": (lambda c: c // QK, np.float16),
    }

    def _quantize_rows(self, x, wt):
        n = x.shape[0]
        xt = _blocks_t(x)
        d16 = _fp16_scale(_symmetric_scale(xt, wt, -32, 31, signed_max=True))
        q = _from_blocks_t((_symmetric_codes(xt, d16, -self.code_offset, self.code_offset - 1) + self.code_offset)
                           .astype(np.uint8), n)  # [n, nb, 32]
        hi = (q >> 4).reshape(n, -1, 4, 8)  # [n, nb, k, j] = hi(q[8k + j])
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return {"ql": _pack_nibbles(q & 15), "qh": qh.reshape(n, -1), "d": d16.reshape(n, -1)}

    def _dequantize_rows(self, parts):
        n = parts["ql"].shape[0]
        low = _unpack_nibbles(parts["ql"])  # [n, nb, 32]
        qh = parts["qh"].reshape(n, -1, 1, 8)
        hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # [n, nb, k, j]
        q = (low | (hi.reshape(n, -1, QK) << 4)).astype(np.float32) - np.float32(self.code_offset)
        return parts["d"].astype(np.float32)[..., None] * q


# --- q4_m: asymmetric 4-bit with 8-bit block scale/min codes under per-row super-scales ----------


def _q4m_fit(xt: np.ndarray, wt: np.ndarray | None, compiled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (scale s >= 0, offset o >= 0) [N] minimising sum w (x - (s*q - o))^2, q in 0..15,
    for blocks xt [32, N] (w = wt, or 1).

    The idea of ggml's make_qkx2_quants: the block minimum is clamped to <= 0 (o = -min >= 0,
    stored as an unsigned code); start from the min/max fit s = (max - min) / 15; try the grid of
    stretched scales (15 + k) / (max - min), k in STRETCH, each rounded to codes and refit by
    weighted least squares for (s, min) (min clamped to <= 0, s refit alone then); keep the lowest
    error (computed in closed form from the sums); then fits.Q4M_REFITS round-and-refit passes from
    the winner. Measured on Gaussian rows: 9 stretches + 3 refits get within 0.2% of ggml's 21
    stretches + 2 refits at half the time; the 8-bit scale codes cost another ~0.2% RMSE.
    Runs compiled (fits.py, the same bits); compiled=False runs the NumPy below, its reference.
    """
    fits = _fits()
    if compiled:
        scale, offset = np.empty(xt.shape[1]), np.empty(xt.shape[1])
        fits.q4m_fit(xt, fits.NO_WEIGHTS if wt is None else wt, scale, offset)
        return scale, offset
    f64 = np.float64
    hi, lo = _block_max_min(xt, compiled=False)
    lo = np.where(lo < 0, lo, np.float32(0.0))
    span = (hi - lo).astype(f64)
    if wt is None:
        sw = np.full(span.shape, float(QK))
        sx = xt.sum(axis=0, dtype=f64)
        sxx = _block_dots(xt, xt).astype(f64)
    else:
        sw = wt.sum(axis=0, dtype=f64)
        wx = wt * xt
        sx = wx.sum(axis=0, dtype=f64)
        sxx = _block_dots(wx, xt).astype(f64)

    inv_span = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)
    best_err = np.full(span.shape, np.inf)
    best_s = span / 15
    best_m = lo.astype(f64)
    q = np.empty_like(xt)
    wq = np.empty_like(xt) if wt is not None else q

    def consider(shift, iscale):
        """Round (x - shift) * iscale to codes, refit (s, min), keep blocks where it is better."""
        np.subtract(xt, shift.astype(np.float32), out=q)
        np.multiply(q, iscale.astype(np.float32), out=q)
        _round_clip(q, 0, 15)
        if wt is not None:
            np.multiply(wt, q, out=wq)
        sq = wq.sum(axis=0, dtype=f64)
        sqq = _block_dots(wq, q).astype(f64)
        sxq = _block_dots(wq, xt).astype(f64)
        det = sw * sqq - sq * sq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s = (sw * sxq - sx * sq) / det
        m = (sqq * sx - sq * sxq) / det
        pos = m > 0  # keep min <= 0: refit the scale alone with min = 0
        m[pos] = 0
        s[pos] = sxq[pos] / np.where(sqq[pos] > 0, sqq[pos], 1.0)
        err = s * s * sqq + 2 * s * m * sq - 2 * s * sxq + m * m * sw - 2 * m * sx + sxx
        better = ok & (s > 0) & (err < best_err)
        best_err[better] = err[better]
        best_s[better] = s[better]
        best_m[better] = m[better]

    for k in fits.Q4M_STRETCH:  # the scale stretches tried around the min/max fit (set once, in fits.py)
        consider(lo, inv_span * (15 + float(k)))
    for _ in range(fits.Q4M_REFITS):
        consider(best_m, np.divide(1.0, best_s, out=np.zeros_like(best_s), where=best_s > 0))
    # + 0.0 turns -0 into +0: a degenerate block's zero scale and offset get one sign everywhere (the
    # compiled twin's came out +0 on arm64 where NumPy's were -0).
    return best_s + 0.0, -best_m + 0.0


class Q4_M(BlockFormat):
    """q4_m: 4-bit asymmetric; each block of 32 has its own scale and minimum, stored as 8-bit
    codes against two float32 super-scales per row (the idea of ggml's Q4_K, with a row as the
    super-block so every part stays row-sliceable).

    | part | dtype   | shape            | per block / row                             |
    |------|---------|------------------|---------------------------------------------|
    | qs   | uint8   | [rows, cols/2]   | 16 bytes per block, nibble order as q4_0    |
    | sc   | uint8   | [rows, cols/32]  | 1 byte per block: scale code                |
    | mn   | uint8   | [rows, cols/32]  | 1 byte per block: min code                  |
    | d    | float32 | [rows, 1]        | 4 bytes per row: scale of the scale codes   |
    | dmin | float32 | [rows, 1]        | 4 bytes per row: scale of the min codes     |

    x[j] = (d*sc) * q[j] - (dmin*mn), q in 0..15 (block scale d*sc and offset dmin*mn computed
    in float32, as the kernels do). 18 bytes per 32 values = 4.5 bits/weight, plus 8 bytes a row.
    Quantize: an error-minimising (scale, min) search per block (_q4m_fit, weighted by importance
    when given); d = max block scale / 255, dmin = max block offset / 255 per row; scale and
    offset rounded to codes; then q re-rounded against the stored scale and offset.
    """

    name = "q4_m"
    format_id = 5
    bits_per_weight = 4.5
    symmetric = False
    _parts: ClassVar[dict] = {
        "qs": (lambda c: c // 2, np.uint8),
        "sc": (lambda c: c // QK, np.uint8),
        "mn": (lambda c: c // QK, np.uint8),
        "d": (lambda c: 1, np.float32),
        "dmin": (lambda c: 1, np.float32),
    }

    def _quantize_rows(self, x, wt):
        n = x.shape[0]
        xt = _blocks_t(x)
        s, o = _q4m_fit(xt, wt)
        s = s.reshape(n, -1)
        o = o.reshape(n, -1)
        d = (s.max(axis=1, keepdims=True) / 255).astype(np.float32)
        dmin = (o.max(axis=1, keepdims=True) / 255).astype(np.float32)
        sc = np.rint(np.divide(s, d, out=np.zeros_like(s), where=d > 0)).clip(0, 255).astype(np.uint8)
        mn = np.rint(np.divide(o, dmin, out=np.zeros_like(o), where=dmin > 0)).clip(0, 255).astype(np.uint8)
        scale = (d * sc.astype(np.float32)).reshape(-1)  # the stored block scale and offset
        offset = (dmin * mn.astype(np.float32)).reshape(-1)
        inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale > 0)
        q = xt + offset
        q *= inv
        _round_clip(q, 0, 15)
        return {"qs": _pack_nibbles(_from_blocks_t(q, n)), "sc": sc, "mn": mn, "d": d, "dmin": dmin}

    def _dequantize_rows(self, parts):
        q = _unpack_nibbles(parts["qs"]).astype(np.float32)
        scale = parts["d"] * parts["sc"].astype(np.float32)
        offset = parts["dmin"] * parts["mn"].astype(np.float32)
        return scale[..., None] * q - offset[..., None]


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (Q8_0(), Q4_0(), Q4_M(), Q6_0())}
# Each format's part names in the kernels' argument order (the order of `part_specs`).
PART_ORDER: dict[str, tuple[str, ...]] = {name: tuple(f._parts) for name, f in FORMATS.items()}
# Every weight format's number, the float ones (not block formats) included: what kernels switch on.
WEIGHT_FORMAT_IDS: dict[str, int] = {"float32": 0, "float16": 1, **{name: f.format_id for name, f in FORMATS.items()}}
SYMMETRIC: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.symmetric)


def get_format(name: str) -> BlockFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise SantacpuError(f"unknown quantization format {name!r}; known: {', '.join(FORMATS)}") from None


@dataclass
class QuantizedWeight:
    """A [rows, cols] weight stored in a block format: `parts` are memory-mapped component arrays,
    each with `rows` as its first dimension (so row ranges slice cleanly)."""

    qtype: str
    shape: tuple[int, int]
    parts: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols] through the format's plain-NumPy reference (tests and the oracle)."""
        return get_format(self.qtype).dequantize(self.parts)

    def take_rows(self, rows: np.ndarray) -> "QuantizedWeight":
        """The given rows (e.g. token ids of an embedding lookup) as a small QuantizedWeight."""
        return QuantizedWeight(self.qtype, (len(rows), self.shape[1]), {k: v[rows] for k, v in self.parts.items()})
