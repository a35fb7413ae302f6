"""The Python API: `load()` a checkpoint, then `logits`, `generate`, `complete`, `complete_stream`.

    import santacpu
    model = santacpu.load("bigcode/santacoder")          # or a local folder
    print(model.complete("def fib(n):", max_new_tokens=32))
    print(model.complete("def add(a, b):\\n    return ", "\\n\\nprint(add(1, 2))"))   # fill-in-the-middle

Generation stops at EOS, at a stop id/string, at max_new_tokens, or when prompt + output fill the
context (n_positions tokens in all).

Prompt reuse: a model keeps the KV cache of its last sequence (prompt + output) and the next
request computes only what follows the longest common token prefix (positions are absolute, so
only an exact prefix is reusable). The cache is sized for the longest request so far and grows
when needed. `model.last_stats` says how many prompt tokens were reused and computed.

Threads: a model may be used from several threads at once. Each generation step holds the model's
lock (the shared cache is per-model state) and every forward holds the engine's process-wide
kernel lock, so steps of concurrent generations interleave, each correct (a generation whose
tokens were pushed out of the shared cache by another recomputes them from the common prefix). A
single generator must not be advanced from two threads at once: Python refuses that itself with
"ValueError: generator already executing".

May import: `santacpu.loading`, `santacpu.generation`, `santacpu.network`, `santacpu.backends`, `santacpu.formats`, foundation modules; never bench, evaluate, cli or `quantize`.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import arguments
from .backends.base import Backend
from .backends.cpu.backend import CpuBackend
from .config import Config
from .errors import SantacpuError, SantacpuWarning
from .formats.quantized_file import names_quantized_file
from .generation.lookup import DEFAULT_DRAFT_TOKENS, PromptLookup
from .generation.prompts import FIM_ORDERS, build_fim_prompt, build_plain_prompt
from .generation.sampling import check_sampling, sample_next
from .generation.text_stream import stream_text
from .loading.checkpoint import read_checkpoint
from .loading.quantized import read_quantized
from .loading.source import hub_revision, resolve
from .network.engine import Engine, check_finite, check_kv_dtype
from .network.kv_cache import KVCache
from .network.weights import ModelWeights
from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128
# Greedy generation drafts tokens by prompt lookup unless told not to (lookup=False), where the
# model's kernels are token-invariant (see CpuBackend.token_invariant): there the output is
# exactly plain decoding's. On others (fp32 / fp16 weights, the float kernels) a verification
# pass can differ from decoding in the last bits, so lookup runs only when asked for (lookup=True).
LOOKUP_BY_DEFAULT = None
# The shared cache grows in steps of this many positions, so a prompt growing by a token per
# request (typing) does not reallocate it every time.
CACHE_GROWTH = 256


@dataclass
class GenerationStats:
    """What one generation did: `Model.last_stats` is the most recently started generation's,
    filled in while it runs."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V were kept from the previous sequence
    computed_tokens: int = 0  # prompt tokens run through the model (at least 1: the last one's logits)
    generated_tokens: int = 0  # tokens yielded
    decode_passes: int = 0  # forwards after the prompt: one per plain step or per verified draft
    drafted_tokens: int = 0  # prompt-lookup tokens proposed
    accepted_tokens: int = 0  # of those, the ones the model agreed with
    time_to_first_token: float | None = None  # seconds from the generation's start to its first token


class _Sequence:
    """One generation's token ids whose K/V are (or are being) computed, and where they live."""

    def __init__(self, tokens: list[int], capacity: int, private_cache: KVCache | None):
        self.tokens = tokens
        self.capacity = capacity  # positions this generation may fill
        self.private_cache = private_cache  # None: the model's shared cache


class Model:
    """A loaded model: `config`, `tokenizer`, and the generation methods.

    `reuse_prompt` (default True; settable later) keeps the last sequence's KV cache for the next
    request; False gives every generation a fresh cache, freed when it ends."""

    def __init__(
        self,
        weights: ModelWeights,
        tokenizer: Tokenizer,
        backend: Backend | None = None,
        *,
        reuse_prompt: bool = True,
        kv_cache: str = "float16",
    ):
        self.config: Config = weights.config
        self.tokenizer = tokenizer
        self.weights = weights
        self._engine = Engine(weights, backend or CpuBackend(), kv_cache)
        # Never sample the embedding's padding rows (49157..49279 for SantaCoder).
        self.n_valid_tokens = min(tokenizer.vocab_size, self.config.vocab_size)
        self.reuse_prompt = reuse_prompt
        self.last_stats: GenerationStats | None = None
        self._lock = threading.RLock()  # guards the shared cache and its owner
        self._cache: KVCache | None = None  # the last sequence's K/V, shared by all generations
        self._cache_owner: _Sequence | None = None  # the generation whose tokens it holds
        # Whether a token's results are the same bits in any forward call (see
        # CpuBackend.token_invariant): then prompt lookup and prompt reuse give exactly the
        # output of plain decoding on a fresh model.
        self.token_invariant = self._engine.backend.token_invariant(weights)

    @property
    def engine(self) -> Engine:
        """The forward pass under this model: a documented internal seam for measurements
        (`santacpu bench` times raw prefill and decode steps through it, without generation's
        bookkeeping), not part of the stable API."""
        return self._engine

    def clear_prompt_cache(self) -> None:
        """Free the kept KV cache (the next request computes its whole prompt)."""
        with self._lock:
            self._cache = self._cache_owner = None

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab_size]: a fresh full forward over `ids` from position 0."""
        ids = arguments.token_ids(ids, self.config.vocab_size)
        if len(ids) > self.config.n_positions:
            raise SantacpuError(f"{len(ids)} tokens exceed the {self.config.n_positions}-token context")
        cache = self._engine.new_cache(len(ids))
        return check_finite(self._engine.forward(cache, ids, all_logits=True))

    def generate(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Iterable[int] = (),
        lookup: bool | None = LOOKUP_BY_DEFAULT,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> Iterator[int]:
        """Stream new token ids after the prompt `ids`. EOS and stop ids end the stream unyielded.

        `lookup`: under greedy decoding (temperature 0), draft up to `draft_tokens` tokens from
        earlier occurrences in the context and verify them in one forward; the output is the same
        as without it. Ignored when sampling. None (the default): on where the model's kernels are
        token-invariant (`Model.token_invariant`), else off."""
        ids = arguments.token_ids(ids, self.config.vocab_size)
        temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
        max_new_tokens = arguments.integer(max_new_tokens, "max_new_tokens", minimum=0)
        draft_tokens = arguments.integer(draft_tokens, "draft_tokens", minimum=1)
        seed = arguments.seed(seed)
        stop_ids = frozenset(arguments.integer(i, "each stop id") for i in stop_ids)
        n_ctx = self.config.n_positions
        if len(ids) >= n_ctx:
            raise SantacpuError(
                f"the prompt is {len(ids)} tokens but the context holds {n_ctx} (prompt and output together): "
                "shorten the prompt"
            )
        if lookup is None:
            lookup = self.token_invariant
        drafter = PromptLookup(ids, draft_tokens) if lookup and temperature == 0.0 else None
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids))
        return self._generate(ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, drafter, stats)

    def _generate(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, drafter, stats) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        ends = stop_ids | {self.config.eos_token_id}
        total = min(self.config.n_positions, len(ids) + max_new_tokens)
        n_valid = self.n_valid_tokens

        def choose(row: np.ndarray) -> int:
            check_finite(row[:n_valid])
            if temperature == 0.0:  # greedy without sample_next's float64 copy of the row
                return int(np.argmax(row[:n_valid]))
            return sample_next(row, n_valid, temperature, top_k, top_p, rng)

        seq = _Sequence([], total, None if self.reuse_prompt else self._engine.new_cache(total))
        logits, computed = self._run(seq, ids, all_logits=False)
        stats.computed_tokens, stats.reused_tokens = computed, len(ids) - computed
        token = choose(logits[-1])
        stats.time_to_first_token = time.perf_counter() - started
        produced = 0
        while True:
            # `token` is chosen, not yet yielded nor fed to the model.
            if token in ends:
                return
            yield token
            produced += 1
            stats.generated_tokens = produced
            room = total - len(ids) - produced  # tokens that may still follow `token`
            if room == 0:
                return  # max_new_tokens reached, or the context is full
            draft = []
            if drafter is not None:
                drafter.append(token)
                draft = drafter.draft(room)
            stats.decode_passes += 1
            if not draft:
                token = choose(self._run(seq, [token], all_logits=False)[0][-1])
                continue
            # Verify: row i of the logits follows [token, *draft[:i]]; keep the longest agreeing run.
            logits = self._run(seq, [token, *draft], all_logits=True)[0]  # [1 + len(draft), V]
            accepted = 0
            while accepted < len(draft) and choose(logits[accepted]) == draft[accepted]:
                accepted += 1
            self._forget(seq, len(draft) - accepted)
            drafter.feedback(len(draft), accepted)
            stats.drafted_tokens += len(draft)
            stats.accepted_tokens += accepted
            for guessed in draft[:accepted]:
                if guessed in ends:
                    return
                yield guessed
                produced += 1
                stats.generated_tokens = produced
                drafter.append(guessed)
            if len(ids) + produced == total:
                return
            token = choose(logits[accepted])

    def _run(self, seq: _Sequence, new: list[int], all_logits: bool) -> tuple[np.ndarray, int]:
        """Append `new` to `seq` and run it. Returns the logits of the new tokens ([len(new), V]
        with all_logits, else [1, V] for the last one) and how many tokens were computed. With
        the shared cache, the longest prefix it already holds is reused (tokens another sequence
        pushed out are recomputed), but never the tokens whose logits are asked for."""
        tokens = seq.tokens
        tokens.extend(new)
        n_out = len(new) if all_logits else 1  # trailing tokens that must be computed for their logits
        with self._lock:
            cache = self._cache_for(seq)
            if seq.private_cache is not None or (self._cache_owner is seq and cache.length == len(tokens) - len(new)):
                keep = cache.length  # it holds exactly this sequence before `new`
            else:
                keep = min(common_prefix_length(cache.ids, tokens), len(tokens) - n_out)
                cache.truncate(keep)
                self._cache_owner = seq
            if all_logits and keep < len(tokens) - n_out:  # catch up first: logits for `new` only
                self._engine.forward(cache, tokens[keep : len(tokens) - n_out])
            logits = self._engine.forward(cache, tokens[cache.length :], all_logits=all_logits)
            return logits, len(tokens) - keep

    def _forget(self, seq: _Sequence, n: int) -> None:
        """Drop the last `n` tokens of `seq` (rejected draft tokens) from it and from its cache."""
        if n == 0:
            return
        del seq.tokens[len(seq.tokens) - n :]
        with self._lock:
            if seq.private_cache is not None:
                seq.private_cache.truncate(len(seq.tokens))
            elif self._cache_owner is seq:  # else another sequence has the shared cache now
                self._cache.truncate(len(seq.tokens))

    def _cache_for(self, seq: _Sequence) -> KVCache:
        """The cache `seq` runs in: its own, or the shared one grown to hold `seq.capacity` positions."""
        if seq.private_cache is not None:
            return seq.private_cache
        if self._cache is None or self._cache.capacity < seq.capacity:
            capacity = min(self.config.n_positions, -(-seq.capacity // CACHE_GROWTH) * CACHE_GROWTH)
            self._cache = self._engine.new_cache(capacity) if self._cache is None else self._cache.resized(capacity)
        return self._cache

    def complete_stream(
        self,
        prefix: str,
        suffix: str | None = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        fim_order: str = "psm",
        lookup: bool | None = LOOKUP_BY_DEFAULT,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> Iterator[str]:
        """Stream the completion of `prefix` as text pieces (whole characters only). With `suffix`,
        fill in the middle between them. Stop strings end the text and are not included.
        `stop` is one stop string or several. `lookup`/`draft_tokens`: prompt-lookup drafting under
        greedy decoding (see `generate`)."""
        prefix = arguments.text(prefix, "prefix")
        suffix = None if suffix is None else arguments.text(suffix, "suffix")
        stop = arguments.stop_strings(stop)
        max_new_tokens = arguments.integer(max_new_tokens, "max_new_tokens", minimum=0)
        if fim_order not in FIM_ORDERS:  # checked even without a suffix: a typo must not pass silently
            raise SantacpuError(f"unknown FIM order '{fim_order}' (choose {' or '.join(FIM_ORDERS)})")
        if suffix is None:
            ids = build_plain_prompt(self.tokenizer, prefix, self.config.n_positions)
        else:
            ids = build_fim_prompt(
                self.tokenizer, prefix, suffix, self.config.n_positions, max_new_tokens, order=fim_order
            )
        tokens = self.generate(
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            lookup=lookup,
            draft_tokens=draft_tokens,
        )
        return stream_text(self.tokenizer, tokens, stop)

    def complete(self, prefix: str, suffix: str | None = None, **options) -> str:
        """The whole completion as one string (see `complete_stream` for the options)."""
        return "".join(self.complete_stream(prefix, suffix, **options))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def _tokenizer_for(folder: os.PathLike, config: Config) -> Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    if config.vocab_size == 49280:
        warnings.warn(
            f"no tokenizer.json in {folder}; using the bundled SantaCoder tokenizer", SantacpuWarning, stacklevel=3
        )
        return Tokenizer.santacoder()
    raise SantacpuError(f"no tokenizer.json in {folder}")


def load(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    device: str = "auto",
    reuse_prompt: bool = True,
    kv_cache: str = "float16",
) -> Model:
    """Load a SantaCoder model: a santacpu quantized file (memory-mapped), a full-precision
    checkpoint folder (either layout; safetensors or pytorch_model.bin) or a weight file inside
    one, or a hub id such as "bigcode/santacoder" (cached by huggingface_hub). `reuse_prompt`:
    see `Model`. `kv_cache`: the KV cache's storage, "float16" (half the memory; rounds K and V
    to 11 significant bits) or "float32" (exact)."""
    if device not in ("auto", "cpu"):
        if device == "cuda":
            raise SantacpuError("device 'cuda' is not available yet: santacpu's GPU backend is not built; use 'cpu'")
        raise SantacpuError(f"unknown device '{device}' (choose 'auto' or 'cpu')")
    check_kv_dtype(kv_cache)  # before the (long) load
    revision = hub_revision(model, revision)
    if names_quantized_file(model):
        path = Path(model).expanduser()
        weights, metadata = read_quantized(path)
        tokenizer = Tokenizer.from_json_text(metadata["tokenizer"], str(path))
        return Model(weights, tokenizer, CpuBackend(), reuse_prompt=reuse_prompt, kv_cache=kv_cache)
    folder = resolve(model, revision)
    weights = read_checkpoint(folder, show_progress=True)
    return Model(
        weights, _tokenizer_for(folder, weights.config), CpuBackend(), reuse_prompt=reuse_prompt, kv_cache=kv_cache
    )
