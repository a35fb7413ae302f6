"""The incremental forward pass used for generation: prefill a prompt, then one token at a time
(`forward`), or the next tokens of several sequences in one pass (`forward_batch`).

Fills the KV cache (`kv_cache.KVCache`). SantaCoder is multi-query: one K and one V head of width head_dim serve all 16
query heads, so the cache is `[n_layer, n_ctx, n_kv_head=1, head_dim]` for K and for V, never
expanded per query head, and stored in fp16 by default (12 MiB each at 2048 tokens; fp32 on
request: `Engine(..., kv_dtype="float32")`). Attention widens each stored row exactly to float32.
The engine never touches an array's values: the backend (CPU or GPU) owns where they live, and
only logits (and the hidden state's finiteness check) come back to the host.

Thread safety: every forward holds one process-wide lock (`KERNEL_LOCK`), so Numba's parallel
kernels never run from two Python threads at once. Numba's `workqueue` threading layer (the one it
falls back to without TBB or OpenMP) aborts the whole process on concurrent parallel calls, and
serialising costs nothing in throughput: one forward already keeps every core busy.

May import: `santacpu.backends.base` (the protocol, never a backend), the network's other
modules, `santacpu.errors`.

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim,
V = vocab_size, L = n_layer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from ..backends.base import Backend
from ..errors import SantacpuError
from .kv_cache import KVCache
from .weights import ModelWeights

# Prompts are processed in chunks of this many tokens: bounds the activations of a 2048-token
# prompt ([T, n_inner] fp32 is 32 MB at 1024) while keeping matrix-matrix products large.
PREFILL_CHUNK = 512

# `Engine.warm_up`'s prompt: long enough that SantaCoder's prompt kernels take their parallel
# variants (the CPU backend picks serial ones for small work), short enough to add about a second
# to a server's start.
WARM_UP_PROMPT = 128

# The KV cache's storage types: fp16 halves its memory and attention's reads (it rounds K and V
# to 11 significant bits, see tests/test_kernels.py for the measured cost); fp32 is exact.
KV_DTYPES = ("float16", "float32")


def check_kv_dtype(kv_dtype: str) -> None:
    """Refuse an unknown KV cache type in one line (before any long work, where callers can)."""
    if kv_dtype not in KV_DTYPES:
        raise SantacpuError(f"unknown KV cache type '{kv_dtype}' (choose {' or '.join(KV_DTYPES)})")

def check_finite(values: np.ndarray) -> np.ndarray:
    """`values` (hidden states or logits) if every one is finite; else the weights are damaged (a
    NaN, or values that overflow), and going on would only pick garbage tokens. The integer
    kernels carry a NaN of x into their products as float arithmetic does (`int_dot.block_rounding`),
    so a NaN anywhere in the network reaches the hidden state checked before the LM head."""
    if not np.isfinite(values).all():
        raise SantacpuError(
            "the model computed values that are not finite (NaN or infinity): its weights hold NaN or "
            "overflowing values (`santacpu info FILE` names the tensor of a quantized file); re-create it from its source"
        )
    return values


# Held by every forward pass, whichever engine or thread runs it (see the module docstring).
KERNEL_LOCK = threading.Lock()


class Engine:
    def __init__(self, weights: ModelWeights, backend: Backend, kv_dtype: str = "float16"):
        check_kv_dtype(kv_dtype)
        self.weights = backend.prepare(weights)  # the backend's form: matrices bound to their kernels (CPU), on the device (CUDA)
        self.config = weights.config
        self.backend = backend
        self.kv_dtype = np.dtype(kv_dtype)
        self._buffers: dict | None = None  # see _decode_buffers

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, n_ctx or c.n_positions, c.n_kv_head, c.head_dim, self.kv_dtype, self.backend)

    def forward(self, cache: KVCache, ids: Sequence[int], all_logits: bool = False, first_logit: int = 0) -> np.ndarray:
        """Run `ids` at positions cache.length.., store their K/V, and return logits:
        [len(ids) - first_logit, V] with all_logits (the LM head runs on ids[first_logit:] only),
        else [1, V] for the last token only."""
        if cache.length + len(ids) > cache.capacity:
            raise ValueError(f"{cache.length} + {len(ids)} tokens exceed the cache's {cache.capacity} positions")
        if not 0 <= first_logit < max(len(ids), 1):
            raise ValueError(f"first_logit {first_logit} is not a position of the {len(ids)} tokens")
        with KERNEL_LOCK, self.backend.forward_context(self.weights, len(ids)):
            return self._forward(cache, ids, all_logits, first_logit)

    def forward_batch(
        self, caches: Sequence[KVCache], inputs: Sequence[Sequence[int]], all_logits: Sequence[bool]
    ) -> list[np.ndarray]:
        """One forward over the next tokens of several sequences, each in its own cache (distinct
        caches): every weight is read once for all their tokens, and each sequence's logits are
        what `forward(cache, ids, all_logits)` returns for it. For decode steps (a token, or a
        token and a draft, per sequence); prompts go through `forward`, chunked."""
        if len({id(c) for c in caches}) != len(caches) or not len(caches) == len(inputs) == len(all_logits):
            raise ValueError("forward_batch takes one distinct cache, one token list and one all_logits flag per sequence")
        for cache, ids in zip(caches, inputs):
            if not ids or cache.length + len(ids) > cache.capacity:
                raise ValueError(f"{cache.length} + {len(ids)} tokens do not fit the cache's {cache.capacity} positions")
        total = sum(len(ids) for ids in inputs)
        if total > PREFILL_CHUNK:
            raise ValueError(f"{total} tokens in one batched step; at most {PREFILL_CHUNK}")
        with KERNEL_LOCK, self.backend.forward_context(self.weights, total):
            hidden = self._checked(self._blocks([(c, list(ids)) for c, ids in zip(caches, inputs)]))
            # Only the rows whose logits are wanted go through the LM head, in one product.
            wanted, bounds, row = [], [], 0
            for ids, every in zip(inputs, all_logits):
                first = row if every else row + len(ids) - 1
                row += len(ids)
                bounds.append((len(wanted), len(wanted) + row - first))
                wanted.extend(range(first, row))
            logits = self._lm_head(hidden if len(wanted) == total else self.backend.take_rows(hidden, wanted))
        return [logits[a:b] for a, b in bounds]

    def warm_up(self) -> None:
        """Make each kind of forward that generation makes once, on throwaway caches, so that the
        kernels they call are compiled (on a first run; else loaded from Numba's cache) before a
        server's first request rather than during it: a prompt with every position's logits, a
        decode step, drafted tokens checked against a cache, a batched step of three sequences."""
        if self.config.n_positions < 6:  # (too short a context for the steps below)
            return
        n = min(WARM_UP_PROMPT, self.config.n_positions - 5)
        ids = [i % self.config.vocab_size for i in range(n)]
        first, second, third = self.new_cache(n + 5), self.new_cache(4), self.new_cache(4)
        self.forward(first, ids, all_logits=True)
        self.forward(first, ids[:1])
        self.forward(first, ids[:3], all_logits=True)
        self.forward(second, ids[:1])
        self.forward(third, ids[:1])
        # one sequence's two tokens, and two one-token sequences (attended in one call)
        self.forward_batch([first, second, third], [ids[:1], ids[:2], ids[:1]], [False, True, False])

    def _forward(self, cache: KVCache, ids: Sequence[int], all_logits: bool, first_logit: int) -> np.ndarray:
        pieces = []
        for first in range(0, len(ids), PREFILL_CHUNK):
            chunk = list(ids[first : first + PREFILL_CHUNK])
            hidden = self._checked(self._blocks([(cache, chunk)]))  # [T, E], final LayerNorm applied
            if all_logits:
                skip = max(first_logit - first, 0)  # this chunk's rows before first_logit
                if skip < len(chunk):
                    wanted = hidden if skip == 0 else self.backend.take_rows(hidden, list(range(skip, len(chunk))))
                    pieces.append(self._lm_head(wanted))
            elif first + PREFILL_CHUNK >= len(ids):
                pieces.append(self._lm_head(hidden if len(chunk) == 1 else hidden[len(chunk) - 1 :]))
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _checked(self, hidden):
        check_finite(self.backend.to_host(hidden))
        return hidden

    def _lm_head(self, hidden) -> np.ndarray:
        """Host logits [T, V] of hidden [T, E]: the tied embedding as the LM head."""
        out = self._decode_buffers()["logits"] if hidden.shape[0] == 1 else None
        logits = self.backend.to_host(self.backend.linear(hidden, self.weights.wte, None, out=out))
        return logits.copy() if logits is out else logits  # the caller keeps it past the next step

    def _decode_buffers(self) -> dict:
        """One token's activations, allocated once and reused by every decode step (the same
        arrays every step also let a GPU backend reuse its prepared launches)."""
        if self._buffers is None:
            c = self.config
            E, I, GD = c.n_embd, c.n_inner, c.n_kv_head * c.head_dim
            shapes = {
                "x": (1, E), "qkv": (1, E + 2 * GD), "attn": (1, E), "proj": (1, E), "f": (1, I), "h": (1, E),
                "logits": (1, c.vocab_size),
            }
            self._buffers = {name: self.backend.empty(shape) for name, shape in shapes.items()}
        return self._buffers

    def _blocks(self, segments: list[tuple[KVCache, list[int]]]) -> np.ndarray:
        """The blocks over the tokens of one or more sequences ([T, E], T = all their tokens, in
        order; the final LayerNorm applied): every product runs once over all T tokens, each
        sequence's K/V rows go to its own cache and its queries attend over that cache only."""
        w, c, b = self.weights, self.config, self.backend
        eps = c.layer_norm_epsilon
        # (cache, first row in this call, position of that row, tokens) per sequence
        spans, row = [], 0
        for cache, ids in segments:
            spans.append((cache, row, cache.length, len(ids)))
            row += len(ids)
        T = row
        ids = np.concatenate([np.asarray(ids, np.int64) for _, ids in segments])
        positions = np.concatenate([np.arange(start, start + n, dtype=np.int64) for _, _, start, n in spans])
        # Decode (T = 1) writes into the same buffers every step; other calls allocate their own,
        # after the embedding (a backend may hand a step's arrays out from a pool from there on).
        buf = self._decode_buffers() if T == 1 else dict.fromkeys(("x", "qkv", "proj", "f", "h"))
        x = b.input_embeddings(w.wte, w.wpe, ids, positions, out=buf.get("x"))  # [T, E], the residual stream
        # A batched step's one-token sequences (two or more) attend in one backend call (one compiled
        # call on the CPU, where a call each cost more than their arithmetic); the rest a call each.
        singles = [span for span in spans if span[3] == 1] if len(spans) > 1 else []
        if len(singles) < 2:
            singles = []
        one_by_one = [span for span in spans if span[3] > 1 or not singles]
        if singles:
            tokens = b.token_batch([(cache.k, cache.v) for cache, _, _, _ in singles], [first for _, first, _, _ in singles],
                                   [start for _, _, start, _ in singles])
        attn = buf["attn"] if T == 1 else b.empty((T, c.n_embd))
        for i, layer in enumerate(w.layers):
            ln_1 = (layer.ln_1_weight, layer.ln_1_bias, eps)
            qkv = b.linear(x, layer.attn_c_attn_weight, layer.attn_c_attn_bias, out=buf["qkv"], norm=ln_1)  # [T, E + 2*G*D]
            if len(spans) == 1:
                b.attend(qkv, spans[0][0].k, spans[0][0].v, i, spans[0][2], attn)
            else:
                if singles:
                    b.attend_tokens(qkv, tokens, i, attn)
                for cache, first, start, n in one_by_one:
                    b.attend(qkv[first : first + n], cache.k, cache.v, i, start, attn[first : first + n])
            b.linear(attn, layer.attn_c_proj_weight, layer.attn_c_proj_bias, out=buf["proj"], add_to=x)
            ln_2 = (layer.ln_2_weight, layer.ln_2_bias, eps)
            f = b.linear(x, layer.mlp_c_fc_weight, layer.mlp_c_fc_bias, out=buf["f"], gelu=True, norm=ln_2)  # [T, I]
            b.linear(f, layer.mlp_c_proj_weight, layer.mlp_c_proj_bias, out=buf["proj"], add_to=x)
        for cache, ids in segments:
            cache.ids.extend(int(t) for t in ids)
        return b.layer_norm(x, w.ln_f_weight, w.ln_f_bias, eps, out=buf["h"])
