"""The kernel layer: the few operations a forward pass needs, behind one small interface.

`CpuBackend` implements them with the Numba kernels of `cpu_kernels.py` / `quant_kernels.py` /
`int_dot.py` and NumPy/BLAS: fp32 weights always go to BLAS (gemv for one token, gemm for many);
compressed weights (fp16, block-quantized), which BLAS cannot read, use a Numba matrix-vector
kernel on the packed data for one token, a few-token kernel that reads the weight once for every
token (speculative verification), and for many tokens either the integer matrix kernel (q4_0,
q4_m, q6_0) or BLAS on widened row tiles (no dequantized copy of a whole matrix ever exists).
On CPUs with integer kernels (x86 AVX2 or VNNI, ARM64 dotprod or i8mm: the backend's `target`,
`target.py`), `prepare` turns the block-quantized matrices into row groups (`row_groups.py`),
whose kernel serves every number of tokens.
It implements `santacpu.backends.base.Backend`, as a GPU backend would. Weight types are dispatched here, at the matmul,
never by copying the forward pass per type.

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.

May import: numba, numpy, threadpoolctl, the CPU backend's kernel modules, `santacpu.formats`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from contextlib import contextmanager

import numba
import numpy as np
import threadpoolctl

from . import cpu_kernels as k
from . import quant_kernels as qk
from . import row_groups
from .target import CpuTarget, host_target, runnable_targets
from ...formats.blocks import QuantizedWeight
from ...formats.safetensors_io import release_mapped_pages
from ...formats.split_rows import SplitRowsWeight

# Numba kernels whose work is below this many (multiply-add or element) operations run on the
# calling thread only: waking Numba's thread pool right after a BLAS call (whose own threads are
# still spinning) costs more than most per-layer kernels take (docs/kernels.md); big ones
# (long-prompt attention, a prompt's GELU) still win in parallel.
PARALLEL_MIN_WORK = 1 << 26
# When the last product ran in Numba's pool (compressed weights: no BLAS), the pool is awake and
# cheap to use again: kernels from this much work on run in parallel. (Decode attention and a
# decode row's GELU use every thread whenever the pool is awake: see attention, gelu_inplace.)
WARM_PARALLEL_MIN_WORK = 1 << 20


def _matrices(layer) -> list:
    """A layer's linear weights: its 2-D fields (the network's LayerWeights, named in words only)."""
    return [w for w in (getattr(layer, f.name) for f in dataclasses.fields(layer)) if len(w.shape) == 2]


@contextmanager
def _numba_threads(n: int):
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


# From this many tokens on, fp16 weights (and quantized ones on the float kernels) are widened
# into tiles for BLAS; below it, one matvec pass (1 token) or the few-token kernel (the widening,
# on one thread, dominates short prompts: docs/kernels.md).
BLAS_MIN_TOKENS = 32
# Rows of a compressed weight widened per BLAS tile: 1024 x 8192 fp32 = 32 MB at most.
TILE_ROWS = 1024


def _compressed_kernels(weight, integer_kernels: bool):
    """(matvec(x, bias, out), matmul_few(x, bias, out), widen_rows(first, last, out), tiled) for
    an fp16 or block-quantized weight; tiled: matmul_few also serves many tokens (the integer
    matrix-matrix kernel), faster than widened tiles through BLAS."""
    if isinstance(weight, QuantizedWeight):
        qtype, parts = weight.qtype, weight.parts
        integer = integer_kernels and qk.has_integer_matmul(qtype)
        return (
            lambda x, bias, out: qk.matvec(qtype, parts, x, bias, out, integer=integer),
            lambda x, bias, out: qk.matmul_few(qtype, parts, x, bias, out, integer=integer),
            lambda first, last, out: qk.dequantize_rows(qtype, parts, first, last, out),
            integer,
        )
    bits = weight.view(np.uint16)  # fp16: Numba has no CPU float16, so pass the bits
    return (
        lambda x, bias, out: k.matvec_f16(bits, x, bias, out),
        lambda x, bias, out: k.matmul_few_f16(bits, x, bias, out, numba.get_num_threads()),
        lambda first, last, out: k.f16_rows_to_f32(bits, first, last, out),
        False,
    )


@functools.cache
def _blas_pools() -> threadpoolctl.ThreadpoolController:
    """The BLAS thread pools loaded in this process (NumPy's), found once."""
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


def blas_single_threaded() -> contextlib.AbstractContextManager:
    """BLAS on the calling thread only inside the block (the previous counts restored after; the
    setting is process-wide, so other Python threads' NumPy products are single-threaded too)."""
    pools = _blas_pools()
    if all(pool.num_threads == 1 for pool in pools.lib_controllers):
        return contextlib.nullcontext()
    return pools.limit(limits=1)


class CpuBackend:
    name = "cpu"

    def __init__(self, integer_kernels: bool = True, target: CpuTarget | None = None):
        # Block-quantized products on the integer kernels where this CPU and the format have them;
        # False: always the float kernels (SANTACPU_INT_DOT=0). `target`: the row groups'
        # instruction set (default: this CPU's best, none where it has no integer instructions).
        self.integer_kernels = integer_kernels
        if target is not None and target not in runnable_targets():  # would abort LLVM or trap
            raise ValueError(f"this CPU cannot run the {target.name} kernels")
        self.target = (target or host_target()) if integer_kernels else None
        self._pool_warm = False  # did the last matrix product run in Numba's pool, not BLAS?
        self._zero_bias: dict[int, np.ndarray] = {}  # n_out -> zeros, for weights without a bias
        self._numba_products: dict[int, bool] = {}  # id(weights) -> see _products_in_numba

    def _threads_for(self, work: int) -> int:
        least = WARM_PARALLEL_MIN_WORK if self._pool_warm else PARALLEL_MIN_WORK
        return numba.get_num_threads() if work >= least else 1

    def describe(self) -> str:
        return "cpu"

    def prepare(self, weights):
        """The weights as loaded (memory-mapped, used where they are), except on CPUs with integer
        kernels: there each matrix of row_groups.FORMATS (the tied embedding too,
        or its parts) becomes row groups (its interleaved copy replaces the file's pages in
        memory, see row_groups.py), and the layers' vectors are copied out of the mapping too
        (reading one would map the whole 2 MiB page around it, mostly released pages)."""
        if self.target is None:
            return weights

        def own_copy(weight):
            if isinstance(weight, QuantizedWeight) and weight.qtype in row_groups.FORMATS:
                return row_groups.group_rows(weight, self.target.rows_per_group)
            if isinstance(weight, np.ndarray) and weight.ndim == 1:
                copy = np.array(weight)
                release_mapped_pages(weight)
                return copy
            return weight

        layers = [
            dataclasses.replace(layer, **{f.name: own_copy(getattr(layer, f.name)) for f in dataclasses.fields(layer)})
            for layer in weights.layers
        ]
        wte = weights.wte
        if isinstance(wte, SplitRowsWeight):
            wte = dataclasses.replace(wte, upgraded=own_copy(wte.upgraded), rest=own_copy(wte.rest))
        return dataclasses.replace(
            weights, wte=own_copy(wte), layers=layers, ln_f_weight=own_copy(weights.ln_f_weight),
            ln_f_bias=own_copy(weights.ln_f_bias),
        )

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, np.float32)

    def new_kv(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def copy_kv_prefix(self, target: np.ndarray, source: np.ndarray, n: int) -> None:
        target[:, :n] = source[:, :n]

    def take_rows(self, x: np.ndarray, rows: list[int]) -> np.ndarray:
        return x[rows]

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def input_embeddings(self, wte, wpe, ids: np.ndarray, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.add(self.embed(wte, ids), self.embed(wpe, positions), out=out)

    def linear(
        self, x: np.ndarray, weight, bias: np.ndarray | None, out: np.ndarray | None = None, *, gelu: bool = False,
        add_to=None, norm=None,
    ) -> np.ndarray:
        """x [T, in] float32, weight [out, in] (float32, float16 or a QuantizedWeight)
        -> x @ weight.T + bias, float32 [T, out] (written into `out` when given: decode reuses
        its buffers); x LayerNormed first with `norm` = (weight, bias, eps); then GELU (`gelu`)
        or added into `add_to` (returned then)."""
        if norm is not None:
            x = self.layer_norm(x, *norm)
        y = self._product(x, weight, bias, out)
        if gelu:
            self.gelu_inplace(y)
        if add_to is None:
            return y
        add_to += y
        return add_to

    def _product(self, x: np.ndarray, weight, bias: np.ndarray | None, out: np.ndarray | None) -> np.ndarray:
        T = x.shape[0]
        n_out, n_in = weight.shape
        if bias is None:
            bias = self._zero_bias.get(n_out)
            if bias is None:
                bias = self._zero_bias[n_out] = np.zeros(n_out, np.float32)
        if out is None:
            out = np.empty((T, n_out), np.float32)
        if isinstance(weight, SplitRowsWeight):  # each part's product, scattered to its rows
            for rows, part in weight.parts:
                out[:, rows] = self._product(x, part, None, None)
            out += bias
            return out
        if isinstance(weight, row_groups.RowGroupWeight):
            self._pool_warm = True
            if out.flags.c_contiguous:
                fits = self.target is not None and self.target.rows_per_group == weight.rows_per_group
                row_groups.matmul(weight, x, bias, out, self.target if fits else None)
            else:
                out[...] = self._product(x, weight, bias, None)
            return out
        if isinstance(weight, np.ndarray) and weight.dtype == np.float32:
            self._pool_warm = False
            np.matmul(x, weight.T, out=out)
            out += bias
            return out
        matvec, matmul_few, widen_rows, tiled = _compressed_kernels(weight, self.integer_kernels)
        self._pool_warm = T < BLAS_MIN_TOKENS or tiled
        if T == 1:
            matvec(x[0], bias, out[0])
            return out
        if T < BLAS_MIN_TOKENS or tiled:  # one pass over the weight for all T tokens
            matmul_few(np.ascontiguousarray(x), bias, out)
            return out
        tile = np.empty((min(TILE_ROWS, n_out), n_in), np.float32)
        for first in range(0, n_out, TILE_ROWS):
            last = min(first + TILE_ROWS, n_out)
            with _numba_threads(1):  # widening is cheap next to the BLAS product that follows
                widen_rows(first, last, tile)
            np.matmul(x, tile[: last - first].T, out=out[:, first:last])
        out += bias
        return out

    def forward_context(self, weights, n_tokens: int) -> contextlib.AbstractContextManager:
        """The context for a forward of `n_tokens` tokens: from BLAS_MIN_TOKENS on, BLAS kept to the
        calling thread when most of the linear weights' products run in Numba's integer matrix
        kernels; else nothing. Why: BLAS's worker threads keep spinning after each call, and then
        fight Numba's over the cores (docs/kernels.md measures it)."""
        if n_tokens >= BLAS_MIN_TOKENS and self._products_in_numba(weights):
            return blas_single_threaded()
        return contextlib.nullcontext()

    def _products_in_numba(self, weights) -> bool:
        """Whether most of a model's linear weights (by size) have the integer matrix kernel."""
        if id(weights) not in self._numba_products:
            tiled = total = 0
            for layer in weights.layers:
                for w in _matrices(layer):
                    size = w.shape[0] * w.shape[1]
                    total += size
                    if self._integer_products(w):
                        tiled += size
            self._numba_products[id(weights)] = 2 * tiled > total
        return self._numba_products[id(weights)]

    def token_invariant(self, weights) -> bool:
        """Whether a token's logits and K/V come out the same bits whichever tokens share its
        forward call (one, a few, a prompt): true when every matrix (and the tied LM head) runs
        the integer kernels, whose per-(row, token) arithmetic never depends on the call; fp32
        and fp16 weights and the float kernels use BLAS for prompts, whose sums differ in the
        last bits. Attention, LayerNorm and GELU are per token on every path."""
        matrices = [weights.wte] + [w for layer in weights.layers for w in _matrices(layer)]
        return all(self._integer_products(w) for w in matrices)

    def _integer_products(self, weight) -> bool:
        if isinstance(weight, SplitRowsWeight):
            return all(self._integer_products(part) for _, part in weight.parts)
        if isinstance(weight, row_groups.RowGroupWeight):
            return True
        return self.integer_kernels and isinstance(weight, QuantizedWeight) and qk.has_integer_matmul(weight.qtype)

    def layer_norm(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray | None = None
    ) -> np.ndarray:
        if out is None:
            out = np.empty_like(x)
        if self._threads_for(4 * x.size) == 1:
            k.layer_norm_serial(x, weight, bias, np.float32(eps), out)
        else:
            k.layer_norm(x, weight, bias, np.float32(eps), out)
        return out

    def gelu_inplace(self, x: np.ndarray) -> None:
        if self._pool_warm and x.shape[0] == 1 and numba.get_num_threads() > 1:
            k.gelu_tanh_split(x[0], numba.get_num_threads())  # decode: one row, cut across the threads
        elif self._threads_for(16 * x.size) == 1:  # tanh: ~16 operations an element
            k.gelu_tanh_inplace_serial(x)
        else:
            k.gelu_tanh_inplace(x)

    def attend(self, qkv: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, layer: int, start: int, out: np.ndarray) -> None:
        """Store qkv's K/V rows [T, E + 2*G*D] at positions start.. of `layer`, then attention
        into out [T, E] (see the protocol)."""
        T, E = out.shape
        _, _, G, D = k_cache.shape
        k_cache[layer, start : start + T] = qkv[:, E : E + G * D].reshape(T, G, D)
        v_cache[layer, start : start + T] = qkv[:, E + G * D :].reshape(T, G, D)
        q = np.ascontiguousarray(qkv[:, :E]).reshape(T, E // D, D)  # T = 1: already contiguous, no copy
        self.attention(q, k_cache[layer], v_cache[layer], start, out=out.reshape(T, E // D, D))

    def attention(
        self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """q [T, H, D] at positions start..start+T-1 over k_cache/v_cache [n_ctx, G, D] (float32 or
        float16) -> [T, H, D] (into `out` when given)."""
        T, H, D = q.shape
        if out is None:
            out = np.empty_like(q)
        if k_cache.dtype == np.float16:  # Numba has no CPU float16: the kernel widens the bits
            k_cache, v_cache = k_cache.view(np.uint16), v_cache.view(np.uint16)
        # Right after a product in Numba's pool (decode) its threads are awake: splitting even a
        # short context's heads pays (one thread against two, 128 positions: 27 -> 20 us).
        threads = numba.get_num_threads() if self._pool_warm else self._threads_for(2 * T * H * D * (start + T))
        jobs = T * k_cache.shape[1]
        head_splits = threads if jobs < threads else 1  # one decode token: split its heads
        with _numba_threads(threads):
            k.causal_attention(q, k_cache, v_cache, start, out, head_splits)
        return out

    def embed(self, table, rows: np.ndarray) -> np.ndarray:
        """Rows of an embedding table (array, QuantizedWeight, RowGroupWeight or SplitRowsWeight)
        as float32 [len(rows), E]."""
        if isinstance(table, SplitRowsWeight):
            out = np.empty((len(rows), table.shape[1]), np.float32)
            for (where, local), (_, part) in zip(table.locate(rows), table.parts):
                if len(where):
                    out[where] = self.embed(part, local)
            return out
        if isinstance(table, row_groups.RowGroupWeight):
            return row_groups.dequantize_rows(table, rows)
        if isinstance(table, QuantizedWeight):
            picked = table.take_rows(rows)
            out = np.empty(picked.shape, np.float32)
            with _numba_threads(1):
                qk.dequantize_rows(picked.qtype, picked.parts, 0, len(rows), out)
            return out
        return table[rows].astype(np.float32)
