"""The kernel layer: the few operations a forward pass needs, behind one small interface.

`CpuBackend` implements them with the Numba kernels of `cpu_kernels.py` / `quant_kernels.py` and
NumPy/BLAS: fp32 weights always go to BLAS (gemv for one token, gemm for many); compressed weights
(fp16, block-quantized), which BLAS cannot read, use a Numba matrix-vector kernel on the packed
data for a few tokens, and BLAS on widened row tiles for many (no dequantized copy of a whole
matrix ever exists).
A GPU backend implements the same methods. Weight types are dispatched here, at the matmul,
never by copying the forward pass per type.

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.
"""

from __future__ import annotations

import numpy as np

from . import cpu_kernels as k
from . import quant_kernels as qk
from .quantized import QuantizedWeight

# Below this many tokens, T matrix-vector passes beat widening the weight into tiles for BLAS.
BLAS_MIN_TOKENS = 8
# Rows of a compressed weight widened per BLAS tile: 1024 x 8192 fp32 = 32 MB at most.
TILE_ROWS = 1024


def _compressed_kernels(weight):
    """(matvec(x, bias, out), widen_rows(first, last, out)) for an fp16 or block-quantized weight."""
    if isinstance(weight, QuantizedWeight):
        qtype, parts = weight.qtype, weight.parts
        return (
            lambda x, bias, out: qk.matvec(qtype, parts, x, bias, out),
            lambda first, last, out: qk.dequantize_rows(qtype, parts, first, last, out),
        )
    bits = weight.view(np.uint16)  # fp16: Numba has no CPU float16, so pass the bits
    return (
        lambda x, bias, out: k.matvec_f16(bits, x, bias, out),
        lambda first, last, out: k.f16_rows_to_f32(bits, first, last, out),
    )


class CpuBackend:
    name = "cpu"

    def linear(self, x: np.ndarray, weight, bias: np.ndarray | None) -> np.ndarray:
        """x [T, in] float32, weight [out, in] (float32, float16 or a QuantizedWeight)
        -> x @ weight.T + bias, float32 [T, out]."""
        T = x.shape[0]
        n_out, n_in = weight.shape
        if bias is None:
            bias = np.zeros(n_out, np.float32)
        if isinstance(weight, np.ndarray) and weight.dtype == np.float32:
            out = x @ weight.T
            out += bias
            return out
        matvec, widen_rows = _compressed_kernels(weight)
        out = np.empty((T, n_out), np.float32)
        if T < BLAS_MIN_TOKENS:
            for t in range(T):
                matvec(x[t], bias, out[t])
            return out
        tile = np.empty((min(TILE_ROWS, n_out), n_in), np.float32)
        for first in range(0, n_out, TILE_ROWS):
            last = min(first + TILE_ROWS, n_out)
            widen_rows(first, last, tile)
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

    def embed(self, table, rows: np.ndarray) -> np.ndarray:
        """Rows of an embedding table (array or QuantizedWeight) as float32 [len(rows), E]."""
        if isinstance(table, QuantizedWeight):
            picked = table.take_rows(rows)
            out = np.empty(picked.shape, np.float32)
            qk.dequantize_rows(picked.qtype, picked.parts, 0, len(rows), out)
            return out
        return table[rows].astype(np.float32)
