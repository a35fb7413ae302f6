"""The Backend protocol: the operations the engine (`santacpu.network.engine`) calls for a forward
pass, as it calls them today. `santacpu.backends.cpu.backend.CpuBackend` implements it; a GPU
backend implements the same methods (structural typing: no base class to inherit).

What the engine owns and a backend does not: the order of the operations (`Engine._blocks`), the
KV cache (`santacpu.network.kv_cache.KVCache`: host NumPy arrays `[n_layer, n_ctx, G, D]`, fp16
or fp32, whose rows the engine writes by slicing; `attention` gets one layer's view), chunking a
prompt into calls of at most `PREFILL_CHUNK` tokens, and the process-wide kernel lock. Every
array passed in and returned is a host NumPy array: activations float32, C-contiguous.

Weights are what loading produced (`santacpu.network.weights.ModelWeights`): a weight matrix is
`[out, in]`, a float32 or float16 array or a `santacpu.formats.blocks.QuantizedWeight`; biases
and LayerNorm parameters are float32 vectors. A backend dispatches on the weight's type inside
`linear` and `embed`, never by a copy of the forward pass per type.

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

    name: str  # "cpu", ...

    def linear(self, x: np.ndarray, weight: Any, bias: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, in] float32, weight [out, in] (float32, float16 or a QuantizedWeight), bias [out]
        float32 or None -> x @ weight.T + bias, float32 [T, out], written into `out` when given
        (decode reuses its buffers). Also the LM head: the tied embedding `wte` [V, E] as weight."""
        ...

    def layer_norm(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray | None = None
    ) -> np.ndarray:
        """LayerNorm of each row of x [T, E] with weight, bias [E] -> float32 [T, E] (into `out`
        when given; x itself is left unchanged)."""
        ...

    def gelu_inplace(self, x: np.ndarray) -> None:
        """GELU (tanh approximation, GPT-2's) of x [T, n_inner] float32, in place."""
        ...

    def attention(
        self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Causal multi-query attention: q [T, H, D] float32 at positions start..start+T-1 over
        one layer's k_cache, v_cache [n_ctx, G, D] (float16 or float32, rows 0..start+T-1
        already written, this call's included) -> float32 [T, H, D] (into `out` when given).
        Query head h reads K/V head h // (H / G). Scores are scaled by 1 / sqrt(D)."""
        ...

    def embed(self, table: Any, rows: np.ndarray) -> np.ndarray:
        """The given rows of an embedding table ([n, E]: an array or a QuantizedWeight) as
        float32 [len(rows), E]; rows are integer token ids or positions."""
        ...

    def forward_context(self, weights: Any, n_tokens: int) -> contextlib.AbstractContextManager:
        """The context the engine enters around every forward of `n_tokens` tokens of the model
        `weights` (a ModelWeights): whatever the backend sets up for that much work (the CPU
        backend keeps BLAS single-threaded while Numba's integer kernels run a prompt), or a
        null context."""
        ...

    def token_invariant(self, weights: Any) -> bool:
        """Whether, for the model `weights` (a ModelWeights), a token's logits and K/V come out the
        same bits whichever tokens share its forward call (one token, a few, a prompt). Prompt
        reuse and prompt-lookup decoding are exact only where this holds; the API turns lookup
        on by default there."""
        ...
