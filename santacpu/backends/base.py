"""The Backend protocol: the operations the engine (`santacpu.network.engine`) calls for a forward
pass. `santacpu.backends.cpu.backend.CpuBackend` and `santacpu.backends.cuda.backend.CudaBackend`
implement it (structural typing: no base class to inherit).

What the engine owns and a backend does not: the order of the operations (`Engine._blocks`), the
KV caches' bookkeeping (`santacpu.network.kv_cache.KVCache`, whose arrays `[n_layer, n_ctx, G, D]`
the backend allocates and fills), chunking a prompt into calls of at most `PREFILL_CHUNK` tokens,
and the process-wide kernel lock. What a backend owns: where arrays live. Activations ("arrays"
below: float32, C-contiguous, 2-D) are host NumPy arrays on the CPU and device arrays on a GPU;
the engine only slices their first axis, and asks for host copies (`to_host`) of what it returns.

Weights: `prepare` receives what loading produced (`santacpu.network.weights.ModelWeights`: a
weight matrix is `[out, in]`, a float32 or float16 array or a `santacpu.formats.blocks.
QuantizedWeight`, and the tied embedding may be a `santacpu.formats.split_rows.SplitRowsWeight`;
biases and LayerNorm parameters are float32 vectors) and returns the weights
the other calls get (the same object on the CPU; device copies on a GPU, uploaded once). A backend
dispatches on the weight's type inside `linear` and `input_embeddings`, never by a copy of the
forward pass per type.

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim,
V = vocab_size.

May import: numpy, `santacpu.formats`. (It names `ModelWeights` in words only: the network is a
higher layer.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """The kernel interface of a forward pass (see the module docstring for who owns what)."""

    name: str  # "cpu", "cuda"

    def describe(self) -> str:
        """Where the forward pass runs, in words ("cpu"; a GPU's name and the device memory its
        weights take)."""
        ...

    def prepare(self, weights: Any) -> Any:
        """The weights (a ModelWeights) as this backend's calls take them: a ModelWeights whose
        matrices are bound to their kernels (the CPU: still the mapped or repacked data), or one of
        device copies (uploaded once, as stored: never a dequantized copy)."""
        ...

    def empty(self, shape: tuple[int, ...]) -> Any:
        """An uninitialised float32 activation array. One asked for during a forward pass, after
        its `input_embeddings`, lives until the next forward pass only (a GPU backend hands a
        decode step's arrays out again in the next step of its size, so that steps repeat: CUDA
        graphs); the engine keeps its own buffers, asked for outside that window."""
        ...

    def new_kv(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Storage for one cache's K or V, [L, n_ctx, G, D], of the KV dtype (float16 or float32)."""
        ...

    def copy_kv_prefix(self, target: Any, source: Any, n: int) -> None:
        """target[:, :n] = source[:, :n] for two K (or V) arrays of `new_kv`."""
        ...

    def input_embeddings(self, wte: Any, wpe: Any, ids: np.ndarray, positions: np.ndarray, out: Any = None) -> Any:
        """wte[ids] + wpe[positions] as float32 [T, E] (into `out` when given); ids, positions:
        host int64 [T]."""
        ...

    def linear(
        self, x: Any, weight: Any, bias: Any, out: Any = None, *, gelu: bool = False, add_to: Any = None, norm: Any = None
    ) -> Any:
        """x [T, in], weight [out, in], bias [out] or None -> y = x @ weight.T + bias [T, out],
        written into `out` when given (decode reuses its buffers); `norm` = (weight, bias, eps):
        the product takes LayerNorm(x) instead of x (x itself unchanged; a GPU fuses it);
        `gelu`: GELU (GPT-2's tanh form) applied to y; `add_to` [T, out]: add_to += y, and
        add_to is returned. Also the LM head: the tied embedding `wte` [V, E] as weight."""
        ...

    def layer_norm(self, x: Any, weight: Any, bias: Any, eps: float, out: Any = None) -> Any:
        """LayerNorm of each row of x [T, E] with weight, bias [E] -> float32 [T, E] (into `out`
        when given; x itself is left unchanged)."""
        ...

    def attend(self, qkv: Any, k_cache: Any, v_cache: Any, layer: int, start: int, out: Any) -> None:
        """One sequence's causal multi-query attention for `layer`: qkv [T, E + 2*G*D] (Q, then K,
        then V) at positions start..start+T-1. Stores the T K and V rows into k_cache, v_cache
        [L, n_ctx, G, D] at those positions, then writes into out [T, E] each query head's
        softmax(q k^T / sqrt(D)) v over positions 0..its own. Query head h reads K/V head
        h // (H / G)."""
        ...

    def token_batch(self, caches: list, rows: list[int], starts: list[int]) -> Any:
        """What `attend_tokens` takes for one new token of each of several sequences (a batched
        decode step), made once for all the step's layers: sequence i's token is row rows[i] of
        qkv and out, at position starts[i] of its cache caches[i] = (k_cache, v_cache)."""
        ...

    def attend_tokens(self, qkv: Any, batch: Any, layer: int, out: Any) -> None:
        """`attend` for each sequence of `batch` (`token_batch`'s) at `layer`: its token's K/V row
        from qkv [T, E + 2*G*D] stored, its attention written into out [T, E] at its row. Each
        row's K/V and result are what `attend` gives that sequence alone, to the bit; only the
        number of calls differs."""
        ...

    def take_rows(self, x: Any, rows: list[int]) -> Any:
        """x[rows] (increasing row indices) as a new array."""
        ...

    def to_host(self, x: Any) -> np.ndarray:
        """x as a host NumPy array (x itself where it already is one)."""
        ...

    def forward_context(self, weights: Any, n_tokens: int) -> contextlib.AbstractContextManager:
        """The context the engine enters around every forward of `n_tokens` tokens of the model
        `weights` (as `prepare` returned them): whatever the backend sets up for that much work
        (the CPU backend keeps BLAS single-threaded while Numba's integer kernels run a prompt),
        or a null context."""
        ...

    def token_invariant(self, weights: Any) -> bool:
        """Whether, for the model `weights`, a token's logits and K/V come out the same bits
        whichever tokens share its forward call (one token, a few, a prompt). Prompt reuse and
        prompt-lookup decoding are exact only where this holds; the API turns lookup on by
        default there."""
        ...
