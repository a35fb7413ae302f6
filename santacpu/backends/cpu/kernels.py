"""Which kernels serve which weight: the CPU backend's one table of kernels per block format, and
the prepared linears `CpuBackend.prepare` binds each matrix to once at load (as gpt-fast and MLX
swap a model's modules when they load it), so that a product is one call.

`FORMAT_KERNELS` is the only place that names a block format's kernels: its float kernels
(`quant_kernels.py`: one token, a few tokens, rows widened for BLAS), and whether `repack.py`
has integer kernels (row groups) for it. A new block format means its class in
`santacpu/formats/blocks.py`, its kernels, and one row here.

A prepared linear (`Linear`) is one matrix [R, C] with its products bound:
- `BlasLinear`: float32, BLAS (gemv for one token, gemm for many);
- `PackedLinear`: fp16 or a block format on the float kernels of the table (no integer kernels:
  SANTACPU_INT_DOT=0, or a CPU without them): one pass over the packed weight for one or a few
  tokens; many tokens through BLAS on widened row tiles (no dequantized copy of a whole matrix
  ever exists);
- `RowGroupLinear`: the row groups of the backend's target (`repack.py`), any number of tokens;
- `SplitLinear`: a matrix stored in two formats (`formats/split_rows.py`): a product per part.

Shape legend: T = tokens in a call, R = a matrix's rows (outputs), C = its columns (inputs).

May import: numba, numpy, the CPU backend's kernel modules, `santacpu.formats`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from . import cpu_kernels as k
from . import int_dot, repack
from . import quant_kernels as qk
from .target import CpuTarget
from ...formats.blocks import PART_ORDER, FORMATS, QuantizedWeight
from ...formats.split_rows import SplitRowsWeight


@dataclass(frozen=True)
class FormatKernels:
    """One block format's kernels. The float kernels take the weight's parts as positional arrays
    (`kernel_args`): matvec(*parts, x [C], bias [R], out [R]); matmul_few(*parts, x [T, C], bias,
    out [T, R], n_chunks); dequantize_rows(*parts, first, last, out [>= last-first, C])."""

    matvec: Callable
    matmul_few: Callable
    dequantize_rows: Callable
    repack: bool  # repack.py interleaves it into row groups for the backend's target


def _row(name: str, matvec: Callable, matmul_few: Callable, dequantize_rows: Callable) -> FormatKernels:
    return FormatKernels(matvec, matmul_few, dequantize_rows, name in repack.FORMATS)


FORMAT_KERNELS: dict[str, FormatKernels] = {
    "q8_0": _row("q8_0", qk.matvec_q8_0, qk.matmul_few_q8_0, qk.dequantize_rows_q8_0),
    "q4_0": _row("q4_0", qk.matvec_q4_0, qk.matmul_few_q4_0, qk.dequantize_rows_q4_0),
    "q4_m": _row("q4_m", qk.matvec_q4_m, qk.matmul_few_q4_m, qk.dequantize_rows_q4_m),
    "q6_0": _row("q6_0", qk.matvec_q6_0, qk.matmul_few_q6_0, qk.dequantize_rows_q6_0),
}
assert set(FORMAT_KERNELS) == set(FORMATS), "every block format needs its row in FORMAT_KERNELS"

# From this many tokens on, fp16 weights (and quantized ones on the float kernels) are widened
# into tiles for BLAS; below it, one matvec pass (1 token) or the few-token kernel (the widening,
# on one thread, dominates short prompts: docs/kernels.md).
BLAS_MIN_TOKENS = 32
# Rows of a compressed weight widened per BLAS tile: 1024 x 8192 fp32 = 32 MB at most.
TILE_ROWS = 1024


@contextmanager
def numba_threads(n: int):
    """Run the Numba kernels in this block with `n` threads (1: on the calling thread)."""
    previous = numba.get_num_threads()
    if n >= previous:  # nothing to change (each set_num_threads costs ~5 us, a decode step makes ~100)
        yield
        return
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


# --- one block format's products, checked ------------------------------------------------------


def kernel_args(qtype: str, parts: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The parts of a `qtype` weight as the kernels' positional arrays (fp16 as uint16 bits)."""
    try:
        names = PART_ORDER[qtype]
    except KeyError:
        raise ValueError(f"no kernels for block format {qtype!r}; known: {', '.join(PART_ORDER)}") from None
    return tuple(parts[n].view(np.uint16) if parts[n].dtype == np.float16 else parts[n] for n in names)


def _shape(qtype: str, args: tuple[np.ndarray, ...]) -> tuple[int, int]:
    codes = args[0]
    return codes.shape[0], codes.shape[1] * FORMATS[qtype].values_per_code_byte


def activation_rounding(target: CpuTarget | None, int8_x_roles: frozenset[str] | None = None) -> dict:
    """reference.forward's `rounded` for a model prepared on `target` (None: the float kernels,
    x as it is): each row-group format's integer range, and ("q8_0", role): 127 for the roles
    whose q8_0 products round x to int8 (default: the target's `int8_x_roles`)."""
    if target is None:
        return {}
    rounded: dict = {qtype: int_dot.ACTIVATION_LEVELS[qtype] for qtype in repack.FORMATS}
    roles = target.int8_x_roles if int8_x_roles is None else int8_x_roles
    rounded.update({("q8_0", role): 127 for role in roles})
    return rounded


def matvec(qtype: str, parts: dict[str, np.ndarray], x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """out [R] = W @ x [C] + bias [R] (all float32) for a block-quantized W given as its parts, on
    the float kernels."""
    args = kernel_args(qtype, parts)
    rows, cols = _shape(qtype, args)
    # The kernels do no bounds checks: a wrong shape here would read or write out of bounds.
    if x.shape != (cols,) or bias.shape != (rows,) or out.shape != (rows,) or out.dtype != np.float32:
        raise ValueError(f"matvec {qtype} [{rows}, {cols}]: got x {x.shape}, bias {bias.shape}, out {out.shape}")
    FORMAT_KERNELS[qtype].matvec(*args, x, bias, out)


def matmul_few(qtype: str, parts: dict[str, np.ndarray], x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """out [T, R] = x [T, C] @ W.T + bias [R] (all float32, C-contiguous) for a block-quantized W,
    reading W once for all T tokens (meant for small T: the float kernels)."""
    args = kernel_args(qtype, parts)
    rows, cols = _shape(qtype, args)
    T = x.shape[0] if x.ndim == 2 else -1
    if x.shape != (T, cols) or bias.shape != (rows,) or out.shape != (T, rows) or out.dtype != np.float32:
        raise ValueError(f"matmul_few {qtype} [{rows}, {cols}]: got x {x.shape}, bias {bias.shape}, out {out.shape}")
    FORMAT_KERNELS[qtype].matmul_few(*args, x, bias, out, numba.get_num_threads())


def dequantize_rows(qtype: str, parts: dict[str, np.ndarray], first: int, last: int, out: np.ndarray) -> None:
    """out[:last-first] (float32 [>= last-first, C]) = rows first..last-1 of W, dequantized."""
    args = kernel_args(qtype, parts)
    rows, cols = _shape(qtype, args)
    if not 0 <= first <= last <= rows or out.ndim != 2 or out.shape[0] < last - first or out.shape[1] != cols:
        raise ValueError(f"dequantize_rows {qtype} [{rows}, {cols}]: rows {first}..{last}, out {out.shape}")
    FORMAT_KERNELS[qtype].dequantize_rows(*args, first, last, out)


# --- prepared linears ----------------------------------------------------------------------------


class Linear:
    """A matrix [R, C] with its products bound. `integer`: its products run the integer kernels,
    so a token's result is the same bits in any call, and any number of tokens runs in Numba's
    pool (no BLAS). `copied_nbytes`: bytes the backend holds of it outside the file mapping."""

    shape: tuple[int, int]
    integer: bool = False
    int8_x: bool = False  # q8_0 on int8 x (`CpuTarget.int8_x_roles`)
    copied_nbytes: int = 0

    def product(self, x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
        """out [T, R] = x [T, C] @ W.T + bias [R], all float32, x C-contiguous."""
        raise NotImplementedError

    def runs_in_numba(self, n_tokens: int) -> bool:
        """Whether a product of n_tokens runs in Numba's thread pool (not BLAS's)."""
        return self.integer

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 [len(ids), C] (an embedding lookup)."""
        raise NotImplementedError


class BlasLinear(Linear):
    def __init__(self, weight: np.ndarray):
        self.weight, self.shape = weight, weight.shape

    def product(self, x, bias, out):
        np.matmul(x, self.weight.T, out=out)
        out += bias

    def runs_in_numba(self, n_tokens: int) -> bool:
        return False

    def rows(self, ids):
        return self.weight[ids].astype(np.float32)


class PackedLinear(Linear):
    """fp16 or a block format on the kernels of FORMAT_KERNELS (the weight used where it is mapped)."""

    def __init__(self, weight):
        self.weight, self.shape = weight, weight.shape
        if isinstance(weight, QuantizedWeight):
            qtype, parts = weight.qtype, weight.parts
            self._matvec = lambda x, bias, out: matvec(qtype, parts, x, bias, out)
            self._matmul_few = lambda x, bias, out: matmul_few(qtype, parts, x, bias, out)
            self._widen_rows = lambda first, last, out: dequantize_rows(qtype, parts, first, last, out)
        else:
            bits = weight.view(np.uint16)  # fp16: Numba has no CPU float16, so pass the bits
            self._matvec = lambda x, bias, out: k.matvec_f16(bits, x, bias, out)
            self._matmul_few = lambda x, bias, out: k.matmul_few_f16(bits, x, bias, out, numba.get_num_threads())
            self._widen_rows = lambda first, last, out: k.f16_rows_to_f32(bits, first, last, out)

    def runs_in_numba(self, n_tokens: int) -> bool:
        return n_tokens < BLAS_MIN_TOKENS

    def product(self, x, bias, out):
        T = x.shape[0]
        if T == 1:
            self._matvec(x[0], bias, out[0])
        elif T < BLAS_MIN_TOKENS:  # one pass over the weight for all T tokens
            self._matmul_few(x, bias, out)
        else:
            n_out, n_in = self.shape
            tile = np.empty((min(TILE_ROWS, n_out), n_in), np.float32)
            for first in range(0, n_out, TILE_ROWS):
                last = min(first + TILE_ROWS, n_out)
                with numba_threads(1):  # widening is cheap next to the BLAS product that follows
                    self._widen_rows(first, last, tile)
                np.matmul(x, tile[: last - first].T, out=out[:, first:last])
            out += bias

    def rows(self, ids):
        if not isinstance(self.weight, QuantizedWeight):
            return self.weight[ids].astype(np.float32)
        picked = self.weight.take_rows(ids)
        out = np.empty(picked.shape, np.float32)
        with numba_threads(1):
            dequantize_rows(picked.qtype, picked.parts, 0, len(ids), out)
        return out


class RowGroupLinear(Linear):
    """Row groups (`repack.py`) on `target`'s tiles (None: the best this CPU runs for them)."""

    integer = True

    def __init__(self, weight: repack.RowGroupWeight, target: CpuTarget | None):
        self.weight, self.shape, self.copied_nbytes = weight, weight.shape, weight.nbytes
        self.int8_x = weight.int8_x
        self.target = target if target is not None and target.rows_per_group == weight.rows_per_group else None

    def product(self, x, bias, out):
        if out.flags.c_contiguous:
            repack.matmul(self.weight, x, bias, out, self.target)
        else:
            whole = np.empty(out.shape, np.float32)
            repack.matmul(self.weight, x, bias, whole, self.target)
            out[...] = whole

    def rows(self, ids):
        return repack.dequantize_rows(self.weight, ids)


class SplitLinear(Linear):
    """A SplitRowsWeight: each part's product, scattered to its rows."""

    def __init__(self, weight: SplitRowsWeight, parts: tuple[Linear, Linear]):
        self.weight, self.shape, self.parts = weight, weight.shape, parts
        self.integer = all(part.integer for part in parts)
        self.int8_x = any(part.int8_x for part in parts)
        self.copied_nbytes = sum(part.copied_nbytes for part in parts)
        self._zero_bias = tuple(np.zeros(len(rows), np.float32) for rows, _ in weight.parts)

    def runs_in_numba(self, n_tokens: int) -> bool:
        return all(part.runs_in_numba(n_tokens) for part in self.parts)

    def product(self, x, bias, out):
        for (rows, _), part, zero in zip(self.weight.parts, self.parts, self._zero_bias):
            part_out = np.empty((x.shape[0], len(rows)), np.float32)
            part.product(x, zero, part_out)
            out[:, rows] = part_out
        out += bias

    def rows(self, ids):
        out = np.empty((len(ids), self.shape[1]), np.float32)
        for (where, local), part in zip(self.weight.locate(ids), self.parts):
            if len(where):
                out[where] = part.rows(local)
        return out


def bind(weight, target: CpuTarget | None, int8_x: bool = False) -> Linear:
    """`weight` (float32 or float16 [R, C], a QuantizedWeight, RowGroupWeight or SplitRowsWeight)
    with its products bound. With a `target`, block formats that have row groups are repacked into
    them (a copy; the file's pages are released, see repack.group_rows); with `int8_x` a q8_0
    weight's products round x to int8 (the backend's choice by role, `CpuTarget.int8_x_roles`)."""
    if isinstance(weight, Linear):
        return weight
    if isinstance(weight, SplitRowsWeight):
        parts = (weight.upgraded, weight.rest)
        return SplitLinear(weight, tuple(bind(part, target, int8_x) for part in parts))
    if isinstance(weight, repack.RowGroupWeight):
        return RowGroupLinear(weight, target)
    if isinstance(weight, QuantizedWeight):
        if target is not None and FORMAT_KERNELS[weight.qtype].repack:
            int8_x = int8_x and weight.qtype == "q8_0"
            return RowGroupLinear(repack.group_rows(weight, target.rows_per_group, int8_x, target.isa), target)
        return PackedLinear(weight)
    if isinstance(weight, np.ndarray) and weight.ndim == 2 and weight.dtype == np.float32:
        return BlasLinear(weight)
    if isinstance(weight, np.ndarray) and weight.ndim == 2 and weight.dtype == np.float16:
        return PackedLinear(weight)
    raise TypeError(f"no CPU kernels for a weight of type {type(weight).__name__} {getattr(weight, 'dtype', '')}")
