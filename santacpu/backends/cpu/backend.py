"""The kernel layer: the few operations a forward pass needs, behind one small interface.

`CpuBackend` implements them with the Numba kernels of `cpu_kernels.py` and the prepared linears
of `kernels.py`: `prepare` binds each matrix once to the products that serve its format (BLAS for
fp32; the packed kernels for fp16 and the block formats; on CPUs with integer kernels, x86 AVX2
or VNNI, ARM64 dotprod or i8mm, the row groups of the backend's `target`, `target.py`), so a
linear layer is one call. It implements `santacpu.backends.base.Backend`, as a GPU backend
would: weight types are dispatched at the matmul, never by copying the forward pass per type.

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.

May import: numba, numpy, threadpoolctl, the CPU backend's kernel modules, `santacpu.formats`,
`santacpu.errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numba
import numpy as np
import threadpoolctl

from . import cpu_kernels as k
from . import kernels
from .kernels import BLAS_MIN_TOKENS
from .target import CpuTarget, host_target, runnable_targets
from ...errors import SantacpuError
from ...formats.safetensors_io import release_mapped_pages

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


def _role(field: str) -> str:
    """A LayerWeights field's role in the kernels' terms: 'mlp_c_fc_weight' -> 'mlp_c_fc'."""
    return field.removesuffix("_weight")


def _model_matrices(weights) -> list:
    """Every matrix a forward multiplies by: the tied embedding / LM head and each layer's."""
    return [weights.wte] + [w for layer in weights.layers for w in _matrices(layer)]


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


def start_thread_pool() -> None:
    """Start Numba's thread pool now, so that a threading layer this machine cannot load (a valid
    NUMBA_THREADING_LAYER such as tbb without its library) fails here, in words, and not as
    Numba's traceback inside the first parallel kernel."""
    from numba.np.ufunc import parallel

    try:
        parallel._launch_threads()  # idempotent; what the first parallel kernel calls
    except ValueError as problem:
        hint = " ".join(line for line in str(problem).splitlines()[1:] if line.strip() != "HINT:")
        raise SantacpuError(
            f"NUMBA_THREADING_LAYER={numba.config.THREADING_LAYER!r} cannot be loaded here"
            + (f" ({hint})" if hint else "") + "; unset it to let Numba choose"
        ) from None


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """`CpuBackend.token_batch`'s checked sequences: where each cache lies, for all of a step's layers."""

    caches: list  # [(k_cache, v_cache)] [L, n_ctx, G, D] each, held while the step runs
    k_bases: np.ndarray  # int64 [B]: each K cache's address (its layer 0)
    v_bases: np.ndarray  # int64 [B]
    layer_bytes: np.ndarray  # int64 [B]: one layer's bytes in each cache
    layers: int  # the fewest layers of any cache
    capacities: np.ndarray  # int64 [B]: positions each cache holds
    rows: np.ndarray  # int64 [B]: each sequence's row of qkv and out
    starts: np.ndarray  # int64 [B]: each token's position
    like: np.ndarray  # an empty array of the caches' element type (fp16 as uint16 bits)
    heads: tuple[int, int]  # (G, D)


class CpuBackend:
    name = "cpu"

    def __init__(self, integer_kernels: bool = True, target: CpuTarget | None = None, q8_0_int16: bool = False):
        start_thread_pool()
        # Block-quantized products on the integer kernels where this CPU and the format have them;
        # False: always the float kernels (SANTACPU_INT_DOT=0). `target`: the row groups'
        # instruction set (default: this CPU's best, none where it has no integer instructions).
        # `q8_0_int16`: q8_0 keeps int16 x in every matrix, whatever the target would round to
        # int8 (SANTACPU_Q8_0_X=int16).
        self.integer_kernels = integer_kernels
        if target is not None and target not in runnable_targets():  # would abort LLVM or trap
            raise ValueError(f"this CPU cannot run the {target.name} kernels")
        self.target = (target or host_target()) if integer_kernels else None
        # The matrices (LayerWeights roles) whose q8_0 products round x to int8.
        self.int8_x_roles = frozenset() if q8_0_int16 or self.target is None else self.target.int8_x_roles
        self._pool_warm = False  # did the last matrix product run in Numba's pool, not BLAS?
        self._zero_bias: dict[int, np.ndarray] = {}  # n_out -> zeros, for weights without a bias
        self._numba_products: dict[int, bool] = {}  # id(weights) -> see _products_in_numba
        self._integer_matrices: tuple[int, int] | None = None  # (on the integer kernels, all) of the last prepare
        self._int8_x_matrices = 0  # of those, q8_0 ones whose x the target rounds to int8

    def _threads_for(self, work: int) -> int:
        least = WARM_PARALLEL_MIN_WORK if self._pool_warm else PARALLEL_MIN_WORK
        return numba.get_num_threads() if work >= least else 1

    def describe(self) -> str:
        """"cpu", and after `prepare` which kernels its matrices run: "cpu: integer kernels for
        avx2", "... (90 of 97 matrices)" where some are not block-quantized, "... (q8_0's layer
        matrices on int8 x)" where the target rounds their x to int8, or "cpu: float kernels" and
        why."""
        if self._integer_matrices is None:
            return "cpu"
        integer, total = self._integer_matrices
        if integer:
            notes = [] if integer == total else [f"{integer} of {total} matrices"]
            if self._int8_x_matrices:
                notes.append("q8_0's layer matrices on int8 x")
            notes = f" ({'; '.join(notes)})" if notes else ""
            return f"cpu: integer kernels for {getattr(self.target, 'name', 'this CPU')}{notes}"
        if not self.integer_kernels:
            return "cpu: float kernels (integer kernels turned off: SANTACPU_INT_DOT=0)"
        if self.target is None:
            return "cpu: float kernels (this CPU has no instruction set of the integer kernels)"
        return "cpu: float kernels (no block-quantized matrices)"

    def prepare(self, weights):
        """The weights with every matrix bound to its prepared linear (`kernels.bind`; the tied
        embedding too). On CPUs with integer kernels the block-quantized matrices become row
        groups (their interleaved copy replaces the file's pages in memory, see repack.py),
        and the layers' vectors are copied out of the mapping too (reading one would map the
        whole 2 MiB page around it, mostly released pages); elsewhere they stay where they are
        mapped."""

        def prepared(weight, role=None):
            if len(weight.shape) == 2:
                return kernels.bind(weight, self.target, role in self.int8_x_roles)
            if self.target is not None and isinstance(weight, np.ndarray):
                copy = np.array(weight)
                release_mapped_pages(weight)
                return copy
            return weight

        layers = [
            dataclasses.replace(layer, **{f.name: prepared(getattr(layer, f.name), _role(f.name)) for f in dataclasses.fields(layer)})
            for layer in weights.layers
        ]
        weights = dataclasses.replace(
            weights, wte=prepared(weights.wte, "lm_head"), layers=layers, ln_f_weight=prepared(weights.ln_f_weight),
            ln_f_bias=prepared(weights.ln_f_bias),
        )
        matrices = _model_matrices(weights)
        self._integer_matrices = (sum(w.integer for w in matrices), len(matrices))
        self._int8_x_matrices = sum(w.int8_x for w in matrices)
        return weights

    def activation_rounding(self) -> dict:
        """reference.forward's `rounded` that mirrors how this backend's prepared matrices round x
        (`kernels.activation_rounding`)."""
        return kernels.activation_rounding(self.target, self.int8_x_roles)

    def _bound(self, weight) -> kernels.Linear:
        """A prepared linear as it is; any other weight bound for this call (never repacked)."""
        return weight if isinstance(weight, kernels.Linear) else kernels.bind(weight, None)

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
        """x [T, in] float32, weight [out, in] (a prepared linear, or any weight `kernels.bind` takes)
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
        linear = self._bound(weight)
        n_out = linear.shape[0]
        if bias is None:
            bias = self._zero_bias.get(n_out)
            if bias is None:
                bias = self._zero_bias[n_out] = np.zeros(n_out, np.float32)
        if out is None:
            out = np.empty((x.shape[0], n_out), np.float32)
        self._pool_warm = linear.runs_in_numba(x.shape[0])
        linear.product(np.ascontiguousarray(x), bias, out)
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
                    if self._bound(w).integer:
                        tiled += size
            self._numba_products[id(weights)] = 2 * tiled > total
        return self._numba_products[id(weights)]

    def token_invariant(self, weights) -> bool:
        """Whether a token's logits and K/V come out the same bits whichever tokens share its
        forward call (one, a few, a prompt): true when every matrix (and the tied LM head) runs
        the integer kernels, whose per-(row, token) arithmetic never depends on the call; fp32
        and fp16 weights and the float kernels use BLAS for prompts, whose sums differ in the
        last bits. Attention, LayerNorm and GELU are per token on every path."""
        return all(self._bound(w).integer for w in _model_matrices(weights))

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

    def token_batch(self, caches: list, rows: list[int], starts: list[int]) -> TokenBatch:
        """The sequences of `attend_tokens` (see the protocol), checked once for a step's layers: the
        kernel reaches each cache by its address, so what it is told must hold (one type and head
        shape, C-contiguous, room for the token)."""
        k0 = caches[0][0]
        _, _, G, D = k0.shape
        for (k_cache, v_cache), start in zip(caches, starts):
            if not (k_cache.dtype == v_cache.dtype == k0.dtype in (np.float16, np.float32) and k_cache.shape == v_cache.shape
                    and k_cache.shape[2:] == (G, D) and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous
                    and 0 <= start < k_cache.shape[1]):
                raise ValueError("attend_tokens takes C-contiguous float16 or float32 caches of one type and head shape, each with room for its token")
        if not len(rows) == len(starts) == len(caches) or min(rows) < 0:
            raise ValueError("attend_tokens takes one row and one start per cache")
        like = k0[:0, 0, 0, 0]
        return TokenBatch(
            caches=list(caches),
            k_bases=np.array([k.__array_interface__["data"][0] for k, _ in caches], np.int64),
            v_bases=np.array([v.__array_interface__["data"][0] for _, v in caches], np.int64),
            layer_bytes=np.array([k.strides[0] for k, _ in caches], np.int64),
            layers=min(k.shape[0] for k, _ in caches),
            capacities=np.array([k.shape[1] for k, _ in caches], np.int64),
            rows=np.array(rows, np.int64),
            starts=np.array(starts, np.int64),
            like=like.view(np.uint16) if k0.dtype == np.float16 else like,
            heads=(G, D),
        )

    def attend_tokens(self, qkv: np.ndarray, batch: TokenBatch, layer: int, out: np.ndarray) -> None:
        """One new token of each of several sequences (see the protocol): one compiled call for all
        of them, each sequence's result the same bits as `attend` gives it alone."""
        (G, D), B, E = batch.heads, len(batch.caches), out.shape[1]
        if not (qkv.flags.c_contiguous and out.flags.c_contiguous and qkv.dtype == out.dtype == np.float32
                and qkv.shape == (out.shape[0], E + 2 * G * D) and E % D == 0
                and int(batch.rows.max()) < out.shape[0] and 0 <= layer < batch.layers):
            raise ValueError("attend_tokens takes float32 C-contiguous qkv [T, E + 2*G*D] and out [T, E] holding its rows, and a layer of the caches")
        offset = layer * batch.layer_bytes
        threads = numba.get_num_threads() if self._pool_warm else self._threads_for(2 * B * E * (int(batch.starts.max()) + 1))
        head_splits = threads if B * G < threads else 1
        with kernels.numba_threads(threads):
            k.attention_of_tokens(qkv, batch.rows, batch.k_bases + offset, batch.v_bases + offset, batch.capacities,
                                  batch.starts, batch.like, out, head_splits, G, D)

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
        jobs = ((T + k.QUERY_TILE - 1) // k.QUERY_TILE) * k_cache.shape[1]
        head_splits = threads if jobs < threads else 1  # a decode token, a few drafted ones: split their heads
        with kernels.numba_threads(threads):
            k.causal_attention(q, k_cache, v_cache, start, out, head_splits)
        return out

    def embed(self, table, rows: np.ndarray) -> np.ndarray:
        """Rows of an embedding table (an array, a prepared linear, or any weight `kernels.bind`
        takes) as float32 [len(rows), E]."""
        if isinstance(table, np.ndarray) and table.dtype == np.float32:
            return table[rows]
        return self._bound(table).rows(rows)
