"""The model's hyper-parameters: one frozen `Config` built from either checkpoint layout's config.json.

Both published layouts describe the same network:
- `bigcode/santacoder`: `model_type: gpt2` with `attention_head_type: multiquery` (remote code);
- `bigcode/gpt_bigcode-santacoder`: `model_type: gpt_bigcode` with `multi_query: true`.
Field names are the checkpoints' own; `n_kv_head` (1 for multi-query, `n_head` for multi-head) and
`head_dim` are derived once here so nothing downstream re-derives them.

May import: `santacpu.small_files`, `santacpu.errors`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from .errors import SantacpuError
from .small_files import CONFIG_LIMIT, read_json_file

# All three names mean the tanh approximation 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))).
TANH_GELU_NAMES = ("gelu_fast", "gelu_pytorch_tanh", "gelu_new")

SANTACODER_EOS_ID = 49152


# The JSON types a stored config's fields may have (`from_metadata`), by the annotation's text.
_FIELD_TYPES = {"int": int, "float": (int, float), "str": str}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string"}


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
        multi_query = _multi_query(raw)
        activation = _supported_activation(raw)

        n_embd, n_head = _integer(raw, "n_embd"), _integer(raw, "n_head")
        n_inner = raw.get("n_inner")  # null or absent: 4 x n_embd, as transformers reads it
        epsilon = raw.get("layer_norm_epsilon", 1e-5)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < 1:
            raise SantacpuError(f"config.json field 'layer_norm_epsilon' is {_shown(epsilon)}, not a number in (0, 1)")
        config = cls(
            model_type=model_type,
            vocab_size=_integer(raw, "vocab_size"),
            n_positions=_integer(raw, "n_positions"),
            n_embd=n_embd,
            n_layer=_integer(raw, "n_layer"),
            n_head=n_head,
            n_kv_head=1 if multi_query else n_head,
            n_inner=4 * n_embd if n_inner is None else _integer(raw, "n_inner"),
            layer_norm_epsilon=float(epsilon),
            activation_function=activation,
            # Early legacy revisions said 50256 (GPT-2's id); SantaCoder's EOS is 49152 whatever they say.
            eos_token_id=SANTACODER_EOS_ID,
        )
        problem = config.size_problem()
        if problem:
            raise SantacpuError(f"config.json: {problem}")
        return config

    @classmethod
    def from_metadata(cls, raw: object) -> "Config":
        """From the config a quantized file stores (`to_dict`'s fields), every field's type and
        every size checked, so a hand-edited file fails here with a message instead of later."""
        if not isinstance(raw, dict):
            raise SantacpuError("its config is not a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in raw if k not in known]
        if unknown:
            raise SantacpuError(f"its config has an unknown field '{unknown[0]}'")
        for name, spec in known.items():
            if name not in raw:
                if name == "eos_token_id":
                    continue
                raise SantacpuError(f"its config lacks the field '{name}'")
            value, wanted = raw[name], _FIELD_TYPES[spec.type]
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise SantacpuError(f"its config field '{name}' is {json.dumps(value)}, not {_TYPE_WORDS[spec.type]}")
        config = cls(**raw)
        if not 0 < config.layer_norm_epsilon < 1:  # NaN too: every LayerNorm would give NaN
            raise SantacpuError(f"its config field 'layer_norm_epsilon' is {_shown(config.layer_norm_epsilon)}, not a number in (0, 1)")
        problem = config.size_problem() or config.kind_problem()
        if problem:
            raise SantacpuError(f"its config: {problem}")
        # Another id outside the vocabulary: generation would never stop at it. SantaCoder's own id
        # is what every checkpoint's config becomes (from_dict), a small test vocabulary included.
        if not 0 <= config.eos_token_id < config.vocab_size and config.eos_token_id != SANTACODER_EOS_ID:
            raise SantacpuError(f"its config field 'eos_token_id' is {config.eos_token_id}, not a token id below vocab_size {config.vocab_size}")
        return config

    def size_problem(self) -> str | None:
        """What makes these sizes unusable (a non-positive size or one past `MAX_SIZES`, heads that
        do not divide the width), or None."""
        sizes = {k: getattr(self, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")}
        bad = [k for k, v in sizes.items() if v <= 0]
        if bad:
            return f"non-positive size: {bad[0]} {sizes[bad[0]]}"
        huge = [k for k, v in sizes.items() if v > MAX_SIZES[k]]
        if huge:
            return f"{huge[0]} {sizes[huge[0]]} is past what santacpu runs (at most {MAX_SIZES[huge[0]]:,})"
        if self.n_embd % self.n_head:
            return f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}"
        if self.n_kv_head not in (1, self.n_head):
            return f"n_kv_head {self.n_kv_head} is neither 1 (multi-query) nor n_head {self.n_head}"
        return None

    def kind_problem(self) -> str | None:
        """What santacpu cannot run about the model's kind (the layout, the activation), or None."""
        if self.model_type not in ("gpt2", "gpt_bigcode"):
            return f"unsupported model_type '{self.model_type}'"
        if self.activation_function not in TANH_GELU_NAMES:
            return f"unsupported activation_function '{self.activation_function}'"
        return None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        raw = read_json_file(path, "config.json", CONFIG_LIMIT)
        if not isinstance(raw, dict):
            raise SantacpuError(f"{path} is not a JSON object")
        return cls.from_dict(raw)


# Sizes far past SantaCoder's (49,280 / 2,048 / 2,048 / 24 / 16 / 8,192) and any model of its kind
# a laptop runs; a config.json's n_layer of 10**9 had the quantizer plan a billion layers before
# it looked for their tensors.
MAX_SIZES = {"vocab_size": 1 << 20, "n_positions": 1 << 20, "n_embd": 1 << 16, "n_layer": 1 << 10, "n_head": 1 << 12,
             "n_inner": 1 << 18}


def _integer(raw: dict, name: str) -> int:
    """config.json's field `name`, an integer (not "4", 4.9 or true)."""
    if name not in raw:
        raise SantacpuError(f"config.json lacks the field '{name}'")
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SantacpuError(f"config.json field '{name}' is {_shown(value)}, not an integer")
    return value


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _multi_query(raw: dict) -> bool:
    """Whether a config.json of either layout describes multi-query attention (one K/V head); an
    error for anything that is not a SantaCoder layout."""
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
        return head_type == "multiquery"
    if model_type == "gpt_bigcode":
        multi_query = raw.get("multi_query", True)
        if not isinstance(multi_query, bool):  # ("false" would be true)
            raise SantacpuError(f"config.json field 'multi_query' is {_shown(multi_query)}, not true or false")
        return multi_query
    raise SantacpuError(
        f"unsupported model_type '{model_type}': santacpu runs SantaCoder checkpoints "
        "(model_type 'gpt2' with attention_head_type, or 'gpt_bigcode')"
    )


def _supported_activation(raw: dict) -> str:
    """The activation function's name, after refusing the variants santacpu does not implement
    (attention scaling flags, cross-attention, another activation)."""
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
    return activation
