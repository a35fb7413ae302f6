"""The kernel layer: the few operations a forward pass needs, behind one small interface.

`CpuBackend` implements them with the Numba kernels of `cpu_kernels.py` and NumPy/BLAS: fp32
weights always go to BLAS (gemv for one token, gemm for many); fp16 weights, which BLAS cannot
read, use a Numba matrix-vector kernel for a few tokens and BLAS on widened tiles for many.
A GPU backend implements the same methods. Weight types are dispatched here, at the matmul,
never by copying the forward pass per type.

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.
"""

from __future__ import annotations

import numpy as np

from . import cpu_kernels as k

# Below this many tokens, T matrix-vector passes beat widening an fp16 weight for BLAS.
BLAS_MIN_TOKENS = 8
# Rows of an fp16 weight widened per BLAS tile: 1024 x 8192 fp32 = 32 MB at most.
F16_TILE_ROWS = 1024


class CpuBackend:
    name = "cpu"

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """x [T, in] float32, weight [out, in] (float32 or float16) -> x @ weight.T + bias [T, out]."""
        T = x.shape[0]
        n_out = weight.shape[0]
        if bias is None:
            bias = np.zeros(n_out, np.float32)
        if weight.dtype == np.float32:
            out = x @ weight.T
            out += bias
            return out
        if T < BLAS_MIN_TOKENS:
            out = np.empty((T, n_out), np.float32)
            for t in range(T):
                k.matvec_f16(weight.view(np.uint16), x[t], bias, out[t])
            return out
        out = np.empty((T, n_out), np.float32)
        tile = np.empty((min(F16_TILE_ROWS, n_out), weight.shape[1]), np.float32)
        bits = weight.view(np.uint16)
        for first in range(0, n_out, F16_TILE_ROWS):
            last = min(first + F16_TILE_ROWS, n_out)
            k.f16_rows_to_f32(bits, first, last, tile)
            np.matmul(x, tile[: last - first].T, out=out[:, first:last])
        out += bias
        return out

    # One token: the serial kernels (see cpu_kernels on why); many tokens: the parallel ones.

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
        out = np.empty_like(x)
        kernel = k.layer_norm_serial if x.shape[0] == 1 else k.layer_norm
        kernel(x, weight, bias, np.float32(eps), out)
        return out

    def gelu_inplace(self, x: np.ndarray) -> None:
        (k.gelu_tanh_inplace_serial if x.shape[0] == 1 else k.gelu_tanh_inplace)(x)

    def attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int) -> np.ndarray:
        """q [T, H, D] at positions start..start+T-1 over k_cache/v_cache [n_ctx, G, D] -> [T, H, D]."""
        out = np.empty_like(q)
        kernel = k.causal_attention_serial if q.shape[0] == 1 else k.causal_attention
        kernel(q, k_cache, v_cache, start, out)
        return out

    def embed(self, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows of an embedding table as float32 [len(rows), E]."""
        return table[rows].astype(np.float32)
