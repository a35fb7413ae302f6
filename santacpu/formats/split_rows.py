"""A matrix whose rows are stored in two block formats: `SplitRowsWeight`.

The tied embedding / LM head is the one user: the rows of the tokens that calibration text uses
most are stored at q8_0, the rest at the embedding's type (q6_0). A few hundred rows cover half of
the tokens a model reads and most of the probability it writes, so their rows buy the most
accuracy per byte of any upgrade (docs/quantization.md has the figures).

Shapes: the weight is [rows, cols]; `upgraded_rows` int32 [k] (ascending) are stored in
`upgraded` [k, cols], every other row, in ascending order, in `rest` [rows - k, cols].
Backends compute a product per part and scatter its outputs to the parts' rows.

May import: numpy, `santacpu.formats.blocks`, `santacpu.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import SantacpuError
from .blocks import FORMATS, QK, SYMMETRIC, QuantizedWeight


@dataclass(frozen=True)
class SplitRowsWeight:
    shape: tuple[int, int]
    upgraded_rows: np.ndarray  # int32 [k], ascending
    upgraded: QuantizedWeight  # [k, cols]
    rest: QuantizedWeight  # [rows - k, cols], the other rows in ascending order
    rest_rows: np.ndarray = field(init=False)  # int32 [rows - k]
    slot: np.ndarray = field(init=False)  # int32 [rows]: index in upgraded (>= 0), or -1 - index in rest

    def __post_init__(self):
        rows, cols = self.shape
        up = np.asarray(self.upgraded_rows)
        k = len(up)
        if up.ndim != 1 or (k and (up.min() < 0 or up.max() >= rows or np.any(np.diff(up) <= 0))):
            raise SantacpuError("upgraded rows must be distinct row numbers in ascending order")
        if self.upgraded.shape != (k, cols) or self.rest.shape != (rows - k, cols):
            raise SantacpuError(f"split rows: parts {self.upgraded.shape} and {self.rest.shape} do not make {list(self.shape)}")
        rest_rows = np.setdiff1d(np.arange(rows, dtype=np.int32), up.astype(np.int32))
        slot = np.empty(rows, np.int32)
        slot[up] = np.arange(k, dtype=np.int32)
        slot[rest_rows] = -1 - np.arange(rows - k, dtype=np.int32)
        object.__setattr__(self, "upgraded_rows", up.astype(np.int32, copy=False))
        object.__setattr__(self, "rest_rows", rest_rows)
        object.__setattr__(self, "slot", slot)

    @property
    def parts(self) -> tuple[tuple[np.ndarray, QuantizedWeight], ...]:
        """(rows [n], weight [n, cols]) for each stored part."""
        return (self.upgraded_rows, self.upgraded), (self.rest_rows, self.rest)

    @property
    def nbytes(self) -> int:
        return self.upgraded.nbytes + self.rest.nbytes + self.upgraded_rows.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols] through the formats' NumPy references."""
        out = np.empty(self.shape, np.float32)
        for rows, weight in self.parts:
            out[rows] = weight.dequantize()
        return out

    def locate(self, ids: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """For each part, (positions in `ids` it holds, their row numbers within the part)."""
        slot = self.slot[np.asarray(ids)]
        upgraded = slot >= 0
        return (np.flatnonzero(upgraded), slot[upgraded]), (np.flatnonzero(~upgraded), -1 - slot[~upgraded])

    def dequantize_rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), cols]: the rows `ids` (an embedding lookup) through the NumPy references."""
        out = np.empty((len(ids), self.shape[1]), np.float32)
        for (where, local), (_, weight) in zip(self.locate(ids), self.parts):
            if len(where):
                out[where] = weight.take_rows(local).dequantize()
        return out


def split_rows(weight: np.ndarray, upgraded_rows: np.ndarray, upgraded_type: str, rest_type: str,
               importance: np.ndarray | None = None) -> SplitRowsWeight:
    """Quantize weight [rows, cols]: `upgraded_rows` (any order) as `upgraded_type`, the rest as `rest_type`."""
    rows = np.unique(np.asarray(upgraded_rows, np.int64)).astype(np.int32)
    keep = np.ones(weight.shape[0], bool)
    keep[rows] = False

    def part(qtype: str, picked: np.ndarray) -> QuantizedWeight:
        fmt = FORMATS[qtype]
        return QuantizedWeight(qtype, (len(picked), weight.shape[1]), fmt.quantize(picked, importance))

    return SplitRowsWeight(tuple(weight.shape), rows, part(upgraded_type, weight[rows]), part(rest_type, weight[keep]))


def widened_to_q8_0(weight: SplitRowsWeight | QuantizedWeight) -> QuantizedWeight:
    """The same values as one q8_0 matrix, exactly (symmetric formats: scale x code, and a code of
    q6_0 or q4_0 fits in int8), for backends with one kernel per matrix (CUDA)."""
    rows, cols = weight.shape
    qs = np.empty((rows, cols), np.int8)
    d = np.empty((rows, cols // QK), np.float16)
    parts = weight.parts if isinstance(weight, SplitRowsWeight) else ((np.arange(rows), weight),)
    for part_rows, part in parts:
        if part.qtype not in SYMMETRIC:
            raise SantacpuError(f"split rows in {part.qtype} cannot widen to q8_0 exactly")
        for first in range(0, len(part_rows), 4096):  # bounded temporaries
            piece = part.take_rows(np.arange(first, min(first + 4096, len(part_rows))))
            scale = piece.parts["d"]
            values = piece.dequantize().reshape(len(scale), -1, QK)
            safe = np.where(scale == 0, 1, scale).astype(np.float32)[..., None]
            codes = np.rint(values / safe)
            qs[part_rows[first : first + len(scale)]] = codes.reshape(len(scale), cols).astype(np.int8)
            d[part_rows[first : first + len(scale)]] = scale
    return QuantizedWeight("q8_0", (rows, cols), {"qs": qs, "d": d})
