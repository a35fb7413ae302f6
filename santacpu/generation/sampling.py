"""Choosing the next token from logits: small pure functions; randomness comes from the caller's
seeded generator, so the same seed gives the same output.

Only the first `n_valid` logits (the tokenizer's vocabulary, 49157 for SantaCoder) are ever
considered: the embedding's padding rows 49157..49279 are never sampled.

May import: numpy, `santacpu.arguments`, `santacpu.errors`.
"""

from __future__ import annotations

import numpy as np

from ..arguments import integer, real
from ..errors import SantacpuError


def check_sampling(temperature: float, top_k: int, top_p: float) -> tuple[float, int, float]:
    """The options as float, int, float, or a SantacpuError naming the one of the wrong type or range."""
    temperature, top_k, top_p = real(temperature, "temperature"), integer(top_k, "top_k"), real(top_p, "top_p")
    if not 0.0 <= temperature < float("inf"):
        raise SantacpuError(f"temperature must be >= 0 and finite (0 means greedy), got {temperature}")
    if top_k < 0:
        raise SantacpuError(f"top_k must be >= 0 (0 means off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise SantacpuError(f"top_p must be in (0, 1] (1 means off), got {top_p}")
    return temperature, top_k, top_p


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the boundary kept), the rest -inf."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most probable tokens whose total reaches p; renormalise."""
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, p)) + 1]  # include the token that crosses p
    kept = np.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def sample_next(
    logits: np.ndarray,
    n_valid: int,
    temperature: float,
    top_k: int,
    top_p: float,
    rng: np.random.Generator,
) -> int:
    """The next token id from one row of logits [vocab_size]."""
    valid = np.asarray(logits[:n_valid], dtype=np.float64)
    if temperature == 0.0:
        return int(np.argmax(valid))
    # Scaled after subtracting the largest: a tiny temperature (1e-310) sends the others to -inf,
    # not every logit to +-inf (whose softmax is NaN).
    with np.errstate(over="ignore"):
        scaled = (valid - valid.max()) / temperature
    probs = top_p_filter(softmax(top_k_filter(scaled, top_k)), top_p)
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), n_valid - 1))
