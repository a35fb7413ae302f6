"""Running generations one sequence at a time over a model's shared prompt cache.

Prompt reuse: `SharedCache` keeps the KV cache of the last sequence (prompt + output) and the next
request computes only what follows the longest common token prefix (positions are absolute, so only
an exact prefix is reusable). The cache is sized for the longest request so far and grows when
needed.

Threads: every run holds the shared cache's lock (the cache is per-model state) and every forward
the engine's process-wide kernel lock, so steps of concurrent generations interleave, each correct
(a generation whose tokens were pushed out of the shared cache by another recomputes them from the
common prefix).

May import: numpy, `santacpu.network`, `santacpu.generation.decoder`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np

from ..network.engine import Engine
from ..network.kv_cache import KVCache
from .decoder import SequenceDecoder

# The shared cache grows in steps of this many positions, so a prompt growing by a token per
# request (typing) does not reallocate it every time.
CACHE_GROWTH = 256


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class CachedSequence:
    """One generation's token ids whose K/V are (or are being) computed, and where they live."""

    def __init__(self, shared: SharedCache, capacity: int, private_cache: KVCache | None):
        self.shared = shared
        self.tokens: list[int] = []
        self.capacity = capacity  # positions this generation may fill
        self.private_cache = private_cache  # None: the shared cache

    def run(self, new: list[int], all_logits: bool) -> tuple[np.ndarray, int]:
        """Append `new` and run it. Returns the logits of the new tokens ([len(new), V] with
        all_logits, else [1, V] for the last one) and how many tokens were computed. In the shared
        cache, the longest prefix it already holds is reused (tokens another sequence pushed out
        are recomputed), but never the tokens whose logits are asked for."""
        tokens = self.tokens
        tokens.extend(new)
        n_out = len(new) if all_logits else 1  # trailing tokens that must be computed for their logits
        shared, engine = self.shared, self.shared.engine
        with shared.lock:
            cache = self._cache()
            if self.private_cache is not None or (shared.owner is self and cache.length == len(tokens) - len(new)):
                keep = cache.length  # it holds exactly this sequence before `new`
            else:
                keep = min(common_prefix_length(cache.ids, tokens), len(tokens) - n_out)
                cache.truncate(keep)
                shared.owner = self
            if all_logits and keep < len(tokens) - n_out:  # catch up first: logits for `new` only
                engine.forward(cache, tokens[keep : len(tokens) - n_out])
            logits = engine.forward(cache, tokens[cache.length :], all_logits=all_logits)
            return logits, len(tokens) - keep

    def forget(self, n: int) -> None:
        """Drop the last `n` tokens (rejected draft tokens) from the sequence and its cache."""
        if n == 0:
            return
        del self.tokens[len(self.tokens) - n :]
        with self.shared.lock:
            if self.private_cache is not None:
                self.private_cache.truncate(len(self.tokens))
            elif self.shared.owner is self:  # else another sequence has the shared cache now
                self.shared.cache.truncate(len(self.tokens))

    def _cache(self) -> KVCache:
        """The cache this sequence runs in: its own, or the shared one grown to hold its capacity."""
        if self.private_cache is not None:
            return self.private_cache
        shared = self.shared
        if shared.cache is None or shared.cache.capacity < self.capacity:
            capacity = min(shared.n_positions, -(-self.capacity // CACHE_GROWTH) * CACHE_GROWTH)
            shared.cache = shared.engine.new_cache(capacity) if shared.cache is None else shared.cache.resized(capacity)
        return shared.cache


class SharedCache:
    """A model's one kept KV cache (the last sequence's) and the sequence whose tokens it holds."""

    def __init__(self, engine: Engine, n_positions: int):
        self.engine = engine  # may be swapped (tests wrap it): read it at each use
        self.n_positions = n_positions
        self.lock = threading.RLock()  # guards `cache` and `owner`
        self.cache: KVCache | None = None
        self.owner: CachedSequence | None = None

    def clear(self) -> None:
        with self.lock:
            self.cache = self.owner = None

    def sequence(self, capacity: int, reuse: bool) -> CachedSequence:
        """A new sequence of at most `capacity` positions: in this shared cache when `reuse`, else in
        a fresh cache of its own (freed with it)."""
        return CachedSequence(self, capacity, None if reuse else self.engine.new_cache(capacity))


def generate_tokens(sequence: CachedSequence, prompt: list[int], decoder: SequenceDecoder) -> Iterator[int]:
    """Drive `decoder` over `sequence`, one forward per step: the generation's tokens as they come."""
    if decoder.finished:  # max_new_tokens = 0: not even the prompt runs
        return
    stats = decoder.stats
    logits, computed = sequence.run(prompt, all_logits=False)
    stats.computed_tokens, stats.reused_tokens = computed, len(prompt) - computed
    yield from decoder.begin(logits[-1])
    while not decoder.finished:
        inputs = decoder.next_inputs()
        logits = sequence.run(inputs, all_logits=len(inputs) > 1)[0]
        emitted, rejected = decoder.advance(logits)
        sequence.forget(rejected)
        yield from emitted
