"""The KV cache of one sequence: keys and values of the tokens seen so far, in the backend's arrays
(host NumPy arrays on the CPU, device arrays on a GPU).

SantaCoder is multi-query: one K and one V head of width head_dim serve all 16 query heads, so
the cache is `[n_layer, n_ctx, n_kv_head=1, head_dim]` for K and for V, never expanded per query
head; fp16 by default, fp32 on request (`Engine(..., kv_dtype="float32")`). The backend allocates
the arrays (`new_kv`), copies a prefix between caches (`copy_kv_prefix`), and writes a call's
rows itself (`attend`).

May import: numpy.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values of the tokens seen so far in one sequence. `arrays`: who allocates and
    copies the storage, with `new_kv` and `copy_kv_prefix` (the engine's backend)."""

    def __init__(self, n_layer: int, n_ctx: int, n_kv_head: int, head_dim: int, dtype, arrays):
        self.dtype = np.dtype(dtype)
        self._arrays = arrays
        self.k = arrays.new_kv((n_layer, n_ctx, n_kv_head, head_dim), self.dtype)  # [L, n_ctx, G, D]
        self.v = arrays.new_kv((n_layer, n_ctx, n_kv_head, head_dim), self.dtype)  # [L, n_ctx, G, D]
        self.ids: list[int] = []  # the tokens whose K/V are stored, position = index

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage, at full capacity."""
        return 2 * int(np.prod(self.k.shape)) * self.dtype.itemsize

    def truncate(self, length: int) -> None:
        """Forget the tokens from position `length` on; the next forward overwrites their K/V rows."""
        del self.ids[length:]

    def copy_prefix_from(self, source: KVCache, n: int) -> None:
        """Take the first `n` tokens of `source` (K/V rows and ids), forgetting this cache's."""
        self._arrays.copy_kv_prefix(self.k, source.k, n)
        self._arrays.copy_kv_prefix(self.v, source.v, n)
        self.ids = list(source.ids[:n])

    def resized(self, capacity: int) -> KVCache:
        """A cache with room for `capacity` positions that holds this one's tokens (K/V copied)."""
        L, _, G, D = self.k.shape
        other = KVCache(L, capacity, G, D, self.dtype, self._arrays)
        other.copy_prefix_from(self, min(self.length, capacity))
        return other
