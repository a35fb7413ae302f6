"""The plain-NumPy fp32 reference forward pass: the oracle every fast path is tested against.

It reads like the model, top to bottom, over a whole sequence at once, with no cache and no
cleverness; weights are widened to float32 where they are used (quantized ones through their
format's NumPy dequantize, so the oracle also checks the kernels that compute on packed blocks). It is itself checked against
logits that transformers produced (tests/test_golden.py).

Shape legend: T = tokens, E = n_embd, H = n_head, G = n_kv_head, D = head_dim, V = vocab_size.

May import: numpy, `santacpu.network.weights`, `santacpu.formats` (blocks, split_rows).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from ..formats.blocks import QuantizedWeight
from ..formats.split_rows import SplitRowsWeight
from .weights import LayerWeights, ModelWeights


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in one temporary of x's shape. x^3 as
    products, not `x**3`: NumPy's float32 power is far slower (it was most of the time of
    calibration's MLP, [tokens, 4 * n_embd] a layer)."""
    y = x * x
    y *= np.float32(0.044715)
    y += np.float32(1.0)
    y *= x  # x + 0.044715 x^3
    y *= np.float32(np.sqrt(2.0 / np.pi))
    np.tanh(y, out=y)
    y += np.float32(1.0)
    y *= x
    y *= np.float32(0.5)
    return y


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias


def dense(weight) -> np.ndarray:
    """Any stored weight (float32, float16, QuantizedWeight, SplitRowsWeight) as a float32 array."""
    if isinstance(weight, (QuantizedWeight, SplitRowsWeight)):
        return weight.dequantize()
    return weight.astype(np.float32, copy=False)


NO_ROUNDING: Mapping = MappingProxyType({})  # the products of fp32 math: x as it is


def round_activations(x: np.ndarray, levels: int = 127) -> np.ndarray:
    """x [..., C] float32 as the integer kernels see it (the row groups, santacpu/backends/cpu/repack.py): per
    block of 32 values, scale = max |x| / levels and x -> round(x * levels / max |x|) * scale."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.divide(np.float32(levels), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.rint(blocks * inverse) * (amax / np.float32(levels))).reshape(x.shape)


def linear(
    x: np.ndarray, weight, bias: np.ndarray | None = None, rounded: Mapping = NO_ROUNDING, role: str | None = None
) -> np.ndarray:
    """x [T, in] @ weight.T + bias; x first goes through round_activations(x, levels) when the
    weight is block-quantized in a format listed in `rounded` (to mirror the integer kernels):
    levels = rounded[(format, role)] where given (the matrix's role: "attn_c_attn", ...,
    "lm_head"), else rounded[format]."""
    if isinstance(weight, SplitRowsWeight):  # each part as its own format, scattered to its rows
        y = np.empty((x.shape[0], weight.shape[0]), np.float32)
        for rows, part in weight.parts:
            y[:, rows] = linear(x, part, None, rounded, role)
        return y if bias is None else y + bias
    if isinstance(weight, QuantizedWeight) and weight.qtype in rounded:
        x = round_activations(x, rounded.get((weight.qtype, role), rounded[weight.qtype]))
    y = x @ dense(weight).T  # [T, in] @ [in, out] -> [T, out]
    return y if bias is None else y + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (KL divergences of close distributions)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def attention_heads(x: np.ndarray, layer: LayerWeights, n_head: int, n_kv_head: int, rounded: Mapping = NO_ROUNDING) -> np.ndarray:
    """Causal multi-query attention of x [T, E] (already normalised), before the output projection."""
    T, E = x.shape
    D = E // n_head
    qkv = linear(x, layer.attn_c_attn_weight, layer.attn_c_attn_bias, rounded, "attn_c_attn")  # [T, E + 2*G*D]
    q = qkv[:, :E].reshape(T, n_head, D).transpose(1, 0, 2)  # [H, T, D]
    k = qkv[:, E : E + n_kv_head * D].reshape(T, n_kv_head, D).transpose(1, 0, 2)  # [G, T, D]
    v = qkv[:, E + n_kv_head * D :].reshape(T, n_kv_head, D).transpose(1, 0, 2)  # [G, T, D]
    group = n_head // n_kv_head  # query heads sharing one K/V head (all 16 for multi-query)
    k = np.repeat(k, group, axis=0)  # [H, T, D]
    v = np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(D))  # [H, T, T]
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(causal, np.float32(-np.inf), scores)
    out = softmax(scores) @ v  # [H, T, D]
    return out.transpose(1, 0, 2).reshape(T, E)  # [T, E]


def attention(x: np.ndarray, layer: LayerWeights, n_head: int, n_kv_head: int, rounded: Mapping = NO_ROUNDING) -> np.ndarray:
    heads = attention_heads(x, layer, n_head, n_kv_head, rounded)
    return linear(heads, layer.attn_c_proj_weight, layer.attn_c_proj_bias, rounded, "attn_c_proj")


def mlp(x: np.ndarray, layer: LayerWeights, rounded: Mapping = NO_ROUNDING) -> np.ndarray:
    h = gelu_tanh(linear(x, layer.mlp_c_fc_weight, layer.mlp_c_fc_bias, rounded, "mlp_c_fc"))  # [T, I]
    return linear(h, layer.mlp_c_proj_weight, layer.mlp_c_proj_bias, rounded, "mlp_c_proj")  # [T, E]


def forward(weights: ModelWeights, ids: Sequence[int], rounded: Mapping = NO_ROUNDING) -> np.ndarray:
    """Logits [T, V] float32 for every position of `ids` (positions 0..T-1). `rounded`: the
    block formats whose products first round x as the integer kernels do, each with its integer
    range, and where a matrix's role rounds differently, (format, role) keys (see `linear`)."""
    c = weights.config
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    assert 0 < T <= c.n_positions, T
    wte = weights.wte
    if isinstance(wte, SplitRowsWeight):
        token_rows = wte.dequantize_rows(ids)
    elif isinstance(wte, QuantizedWeight):
        token_rows = wte.take_rows(ids).dequantize()
    else:
        token_rows = dense(wte[ids])
    x = token_rows + dense(weights.wpe[:T])  # [T, E]
    for layer in weights.layers:
        normed = layer_norm(x, layer.ln_1_weight, layer.ln_1_bias, c.layer_norm_epsilon)
        x = x + attention(normed, layer, c.n_head, c.n_kv_head, rounded)
        x = x + mlp(layer_norm(x, layer.ln_2_weight, layer.ln_2_bias, c.layer_norm_epsilon), layer, rounded)
    x = layer_norm(x, weights.ln_f_weight, weights.ln_f_bias, c.layer_norm_epsilon)
    return linear(x, weights.wte, None, rounded, "lm_head").astype(np.float32)  # tied LM head: [T, V]
