"""The model's hyper-parameters: one frozen `Config` built from either checkpoint layout's config.json.

Both published layouts describe the same network:
- `bigcode/santacoder`: `model_type: gpt2` with `attention_head_type: multiquery` (remote code);
- `bigcode/gpt_bigcode-santacoder`: `model_type: gpt_bigcode` with `multi_query: true`.
Field names are the checkpoints' own; `n_kv_head` (1 for multi-query, `n_head` for multi-head) and
`head_dim` are derived once here so nothing downstream re-derives them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .errors import SantacpuError

# All three names mean the tanh approximation 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))).
TANH_GELU_NAMES = ("gelu_fast", "gelu_pytorch_tanh", "gelu_new")

# The tokenizer's vocabulary; embedding rows from here to vocab_size are padding, never sampled.
SANTACODER_TOKENIZER_VOCAB = 49157
SANTACODER_EOS_ID = 49152


@dataclass(frozen=True)
class Config:
    model_type: str  # "gpt2" (legacy bigcode/santacoder) or "gpt_bigcode"
    vocab_size: int  # embedding rows, 49280 for SantaCoder
    n_positions: int  # context length, 2048
    n_embd: int  # hidden width, 2048
    n_layer: int  # 24
    n_head: int  # query heads, 16
    n_kv_head: int  # key/value heads: 1 (multi-query) or n_head (multi-head)
    n_inner: int  # MLP width, 8192
    layer_norm_epsilon: float
    activation_function: str
    eos_token_id: int = SANTACODER_EOS_ID

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: n_kv_head * head_dim (128 for SantaCoder)."""
        return self.n_kv_head * self.head_dim

    @property
    def multi_query(self) -> bool:
        return self.n_kv_head == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """Build from a config.json dictionary of either layout; unsupported variants get a clear error."""
        model_type = raw.get("model_type")
        if model_type == "gpt2":
            head_type = raw.get("attention_head_type")
            if head_type is None:
                raise SantacpuError(
                    "config.json has model_type 'gpt2' but no attention_head_type: this is plain GPT-2, "
                    "not a SantaCoder checkpoint"
                )
            if head_type not in ("multiquery", "multihead"):
                raise SantacpuError(
                    f"unsupported attention_head_type '{head_type}' (santacpu supports 'multiquery' and 'multihead')"
                )
            multi_query = head_type == "multiquery"
        elif model_type == "gpt_bigcode":
            multi_query = bool(raw.get("multi_query", True))
        else:
            raise SantacpuError(
                f"unsupported model_type '{model_type}': santacpu runs SantaCoder checkpoints "
                "(model_type 'gpt2' with attention_head_type, or 'gpt_bigcode')"
            )

        for flag, fine in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if raw.get(flag, fine) != fine:
                raise SantacpuError(f"unsupported config: {flag}={raw[flag]!r} (santacpu needs {fine!r})")

        activation = raw.get("activation_function", "gelu_pytorch_tanh")
        if activation not in TANH_GELU_NAMES:
            raise SantacpuError(
                f"unsupported activation_function '{activation}' (santacpu implements the tanh GELU: "
                f"{', '.join(TANH_GELU_NAMES)})"
            )

        try:
            n_embd = int(raw["n_embd"])
            n_head = int(raw["n_head"])
            config = cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                n_positions=int(raw["n_positions"]),
                n_embd=n_embd,
                n_layer=int(raw["n_layer"]),
                n_head=n_head,
                n_kv_head=1 if multi_query else n_head,
                n_inner=int(raw.get("n_inner") or 4 * n_embd),
                layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
                activation_function=activation,
                # Early legacy revisions said 50256 (GPT-2's id); SantaCoder's EOS is 49152 whatever they say.
                eos_token_id=SANTACODER_EOS_ID,
            )
        except KeyError as missing:
            raise SantacpuError(f"config.json lacks the field {missing}") from None
        except (TypeError, ValueError) as bad:
            raise SantacpuError(f"config.json has a malformed field: {bad}") from None
        if min(config.n_embd, config.n_head, config.n_layer, config.vocab_size, config.n_positions) <= 0:
            raise SantacpuError("config.json has a non-positive size")
        if config.n_embd % config.n_head:
            raise SantacpuError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise SantacpuError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise SantacpuError(f"{path} is not valid JSON: {bad}") from None
        if not isinstance(raw, dict):
            raise SantacpuError(f"{path} is not a JSON object")
        return cls.from_dict(raw)
