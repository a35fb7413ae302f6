"""The KV cache of one sequence: keys and values of the tokens seen so far, as host NumPy arrays.

SantaCoder is multi-query: one K and one V head of width head_dim serve all 16 query heads, so
the cache is `[n_layer, n_ctx, n_kv_head=1, head_dim]` for K and for V, never expanded per query
head; fp16 by default, fp32 on request (`Engine(..., kv_dtype="float32")`). The engine writes a
call's K/V rows by NumPy slicing and hands a backend's `attention` one layer's `[n_ctx, G, D]`.

May import: numpy.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values of the tokens seen so far in one sequence."""

    def __init__(self, n_layer: int, n_ctx: int, n_kv_head: int, head_dim: int, dtype=np.float16):
        self.k = np.zeros((n_layer, n_ctx, n_kv_head, head_dim), dtype)  # [L, n_ctx, G, D]
        self.v = np.zeros((n_layer, n_ctx, n_kv_head, head_dim), dtype)  # [L, n_ctx, G, D]
        self.ids: list[int] = []  # the tokens whose K/V are stored, position = index

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def truncate(self, length: int) -> None:
        """Forget the tokens from position `length` on; the next forward overwrites their K/V rows."""
        del self.ids[length:]

    def resized(self, capacity: int) -> KVCache:
        """A cache with room for `capacity` positions that holds this one's tokens (K/V copied)."""
        L, _, G, D = self.k.shape
        other = KVCache(L, capacity, G, D, self.k.dtype)
        n = min(self.length, capacity)
        other.k[:, :n] = self.k[:, :n]
        other.v[:, :n] = self.v[:, :n]
        other.ids = self.ids[:n]
        return other
