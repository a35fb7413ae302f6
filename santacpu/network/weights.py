"""The model's weights in santacpu's one canonical layout, whatever checkpoint they came from.

Canonical layout (the `gpt_bigcode` one, which is also what a matrix-vector kernel wants):
- every projection matrix is `[out, in]`, row-major, so `y = W @ x + b` streams W row by row and a
  quantization block runs along the input dimension;
- attention's Q, K and V projections are one fused matrix `attn_c_attn_weight` whose rows are
  `Q (n_head*head_dim) | K (n_kv_head*head_dim) | V (n_kv_head*head_dim)`;
- big matrices keep the checkpoint's float32 or float16 (memory-mapped when no conversion is
  needed); LayerNorm parameters, biases and nothing else are made float32.
The tied embedding `wte` doubles as the LM head: logits = ln_f(h) @ wte^T.

May import: numpy, `santacpu.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..config import Config

# The four matrices of a layer that the block formats quantize (the rest are vectors).
LINEAR_WEIGHTS = ("attn_c_attn_weight", "attn_c_proj_weight", "mlp_c_fc_weight", "mlp_c_proj_weight")

# Shape legend: E = n_embd, I = n_inner, V = vocab_size, P = n_positions, KV = kv_dim
# (n_kv_head * head_dim), QKV = E + 2*KV.


@dataclass
class LayerWeights:
    ln_1_weight: np.ndarray  # [E] float32
    ln_1_bias: np.ndarray  # [E]
    attn_c_attn_weight: np.ndarray  # [QKV, E]
    attn_c_attn_bias: np.ndarray  # [QKV]
    attn_c_proj_weight: np.ndarray  # [E, E]
    attn_c_proj_bias: np.ndarray  # [E]
    ln_2_weight: np.ndarray  # [E]
    ln_2_bias: np.ndarray  # [E]
    mlp_c_fc_weight: np.ndarray  # [I, E]
    mlp_c_fc_bias: np.ndarray  # [I]
    mlp_c_proj_weight: np.ndarray  # [E, I]
    mlp_c_proj_bias: np.ndarray  # [E]


@dataclass
class ModelWeights:
    config: Config
    wte: np.ndarray  # [V, E] token embedding, also the LM head
    wpe: np.ndarray  # [P, E] learned absolute positions
    layers: list[LayerWeights]
    ln_f_weight: np.ndarray  # [E] float32
    ln_f_bias: np.ndarray  # [E]


def expected_layer_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Canonical shape of every LayerWeights field, for validating what a loader produced."""
    E, I, QKV = config.n_embd, config.n_inner, config.n_embd + 2 * config.kv_dim
    return {
        "ln_1_weight": (E,),
        "ln_1_bias": (E,),
        "attn_c_attn_weight": (QKV, E),
        "attn_c_attn_bias": (QKV,),
        "attn_c_proj_weight": (E, E),
        "attn_c_proj_bias": (E,),
        "ln_2_weight": (E,),
        "ln_2_bias": (E,),
        "mlp_c_fc_weight": (I, E),
        "mlp_c_fc_bias": (I,),
        "mlp_c_proj_weight": (E, I),
        "mlp_c_proj_bias": (E,),
    }


def layer_field_names() -> list[str]:
    return [f.name for f in fields(LayerWeights)]
