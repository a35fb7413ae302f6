"""The Python API: `load()` a checkpoint, then `logits`, `generate`, `complete`, `complete_stream`;
many sequences at once: `generate_batch`, `complete_many`, and `scheduler` for continuous batching.

    import santacpu
    model = santacpu.load("bigcode/santacoder")          # or a local folder; runs as q8_0 (quant="none": fp32)
    print(model.complete("def fib(n):", max_new_tokens=32))
    print(model.complete("def add(a, b):\\n    return ", "\\n\\nprint(add(1, 2))"))   # fill-in-the-middle

Every generation method takes a `GenerationOptions` and/or its fields as keywords (see
`santacpu.generation.options`). Generation stops at EOS, at a stop id/string, at max_new_tokens, or
when prompt + output fill the context (n_positions tokens in all).

Prompt reuse: a model keeps the KV cache of its last sequence (prompt + output) and the next
request computes only what follows the longest common token prefix (see
`santacpu.generation.runner`). `model.last_stats` says how many prompt tokens were reused and
computed.

Threads: a model may be used from several threads at once; steps of concurrent generations
interleave, each correct (see `santacpu.generation.runner`). A single generator must not be
advanced from two threads at once: Python refuses that itself with "ValueError: generator already
executing".

First use of a full-precision model: `load` runs it as its quantization (`quant`, default q8_0,
as every command does), made once into the cache by `quantize.cache.runnable_model`, the one
policy the command line, the server and the harness share through `load` and `runnable_model`.

May import: `santacpu.loading`, `santacpu.generation`, `santacpu.network`, `santacpu.backends`,
`santacpu.formats`, foundation modules, and `quantize.cache` (first-use quantization, imported when
a full-precision model is loaded); never bench, evaluate or cli.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from . import arguments, errors
from .backends import DEVICES
from .backends.base import Backend
from .backends.cpu.backend import CpuBackend
from .backends.cuda import device as cuda_device
from .config import Config
from .errors import SantacpuError
from .formats.quantized_file import names_quantized_file
from .generation.batch import DEFAULT_MAX_BATCH, BatchScheduler
from .generation.decoder import GenerationStats, SequenceDecoder
from .generation.options import GenerationOptions
from .generation.prompts import build_fim_prompt, build_plain_prompt, fim_options
from .generation.runner import SharedCache, generate_tokens
from .generation.text_stream import StopStrings, stream_text
from .loading.checkpoint import read_checkpoint
from .loading.quantized import embedded_tokenizer, read_quantized
from .loading.source import hub_revision, resolve
from .network.engine import Engine, check_finite, check_kv_dtype
from .network.weights import ModelWeights
from .settings import Settings
from .tokenizer import StreamDecoder, Tokenizer
from .paths import user_path


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
        engine = Engine(weights, backend or CpuBackend(), kv_cache)
        # Never sample the embedding's padding rows (49157..49279 for SantaCoder).
        self.n_valid_tokens = min(tokenizer.vocab_size, self.config.vocab_size)
        self.reuse_prompt = reuse_prompt
        self.last_stats: GenerationStats | None = None
        self._shared = SharedCache(engine, self.config.n_positions)
        # Whether a token's results are the same bits in any forward call (see
        # CpuBackend.token_invariant): then prompt lookup and prompt reuse give exactly the
        # output of plain decoding on a fresh model.
        self.token_invariant = engine.backend.token_invariant(engine.weights)

    @property
    def reuse_prompt(self) -> bool:
        return self._reuse_prompt

    @reuse_prompt.setter
    def reuse_prompt(self, value: bool) -> None:
        if not isinstance(value, bool):  # ("no" would be true)
            raise SantacpuError(f"reuse_prompt must be True or False, got {value!r}")
        self._reuse_prompt = value

    @property
    def device(self) -> str:
        """Where the forward pass runs, in words: "cpu", or "cuda: <GPU name>, <MB> MB of device
        memory for the weights"."""
        return self.engine.backend.describe()

    @property
    def engine(self) -> Engine:
        """The forward pass under this model: a documented internal seam for measurements
        (`santacpu bench` times raw prefill and decode steps through it, without generation's
        bookkeeping) and for tests (which may wrap it to count or script forwards), not part of
        the stable API."""
        return self._shared.engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._shared.engine = engine

    def warm_up(self) -> None:
        """Run each kind of forward a generation makes once (a prompt, a decode step, drafted
        tokens, a batched step), on caches of its own: a first run compiles the kernels here,
        later runs load them from Numba's cache, so a server's first request pays for neither.
        Leaves the prompt cache as it was."""
        self.engine.warm_up()

    def clear_prompt_cache(self) -> None:
        """Free the kept KV cache (the next request computes its whole prompt)."""
        self._shared.clear()

    def logits(self, ids: Sequence[int], first: int = 0) -> np.ndarray:
        """float32 [len(ids) - first, vocab_size]: a fresh full forward over `ids` from position 0,
        the logits of positions first.. (the LM head, a large share of a short forward, runs on
        those only)."""
        ids = arguments.token_ids(ids, self.config.vocab_size)
        if len(ids) > self.config.n_positions:
            raise SantacpuError(f"{len(ids)} tokens exceed the {self.config.n_positions}-token context")
        first = arguments.integer(first, "first", minimum=0)
        if first >= len(ids):
            raise SantacpuError(f"first must be a position of the {len(ids)} tokens, got {first}")
        cache = self.engine.new_cache(len(ids))
        return check_finite(self.engine.forward(cache, ids, all_logits=True, first_logit=first))

    def decoder(self, ids: Sequence[int], options: GenerationOptions) -> SequenceDecoder:
        """The token-level state of one generation of `ids` under checked `options`: what
        `generate` drives, and what a batch scheduler drives the same way."""
        ids = arguments.token_ids(ids, self.config.vocab_size)
        n_ctx = self.config.n_positions
        if len(ids) >= n_ctx:
            raise SantacpuError(
                f"the prompt is {len(ids)} tokens but the context holds {n_ctx} (prompt and output together): "
                "shorten the prompt"
            )
        outside = sorted(i for i in options.stop_ids if not 0 <= i < self.config.vocab_size)
        if outside:  # as a prompt's ids are checked: a typo'd id would never stop anything
            raise SantacpuError(f"stop id {outside[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        lookup = self.token_invariant if options.lookup is None else options.lookup
        return SequenceDecoder(
            ids,
            options,
            eos_id=self.config.eos_token_id,
            n_positions=n_ctx,
            n_valid=self.n_valid_tokens,
            lookup=lookup,
        )

    def generate(self, ids: Sequence[int], options: GenerationOptions | None = None, **changes) -> Iterator[int]:
        """Stream new token ids after the prompt `ids`, under `options` with `changes` applied (for
        example `max_new_tokens=32, temperature=0.8, seed=1`). EOS and stop ids end the stream
        unyielded. Text-level options (`stop`, `fim_order`) are for the text methods: given here
        they are an error, not silently ignored."""
        return self._generate(ids, _token_level(options, changes, "generate"))

    def _generate(self, ids: Sequence[int], options: GenerationOptions) -> Iterator[int]:
        """`generate` under checked options (the text methods' own stop strings included)."""
        ids = arguments.token_ids(ids, self.config.vocab_size)
        decoder = self.decoder(ids, options)
        self.last_stats = decoder.stats
        sequence = self._shared.sequence(decoder.total, reuse=self.reuse_prompt)
        return generate_tokens(sequence, ids, decoder)

    def scheduler(
        self,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_kv_bytes: int | None = None,
        max_queue: int | None = None,
        keep_caches: int | None = None,
    ) -> BatchScheduler:
        """A continuous-batching scheduler over this model (`santacpu.generation.batch`): `submit`
        sequences (each with its own options) at any time, drive it with `step()` or `run()`. At
        most `max_batch` sequences run at once, their KV caches within `max_kv_bytes` (None: no
        bound); at most `max_queue` wait (None: no bound). The caches of the last `keep_caches`
        sequences that left serve later prompts' common prefixes (None: 4, or 0 where
        `reuse_prompt` is off)."""
        if keep_caches is None:
            keep_caches = 4 if self.reuse_prompt else 0
        keep_caches = arguments.integer(keep_caches, "keep_caches", minimum=0)
        max_batch = arguments.integer(max_batch, "max_batch", minimum=1)
        if max_kv_bytes is not None:
            max_kv_bytes = arguments.integer(max_kv_bytes, "max_kv_bytes", minimum=1)
        if max_queue is not None:
            max_queue = arguments.integer(max_queue, "max_queue", minimum=0)
        return BatchScheduler(
            self.engine,
            self.decoder,
            max_batch=max_batch,
            max_kv_bytes=max_kv_bytes,
            max_queue=max_queue,
            keep_caches=keep_caches,
        )

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        options: GenerationOptions | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        **changes,
    ) -> Iterator[tuple[int, int]]:
        """Generate after each prompt (token ids) under one set of options, `max_batch` sequences
        at a time: (prompt index, token id) pairs as they come. Each sequence's tokens are what
        `generate` gives it alone wherever the kernels are token-invariant. Every prompt is
        checked before anything runs."""
        options = _token_level(options, changes, "generate_batch")
        scheduler = self.scheduler(max_batch=max_batch)
        for ids in _non_empty(prompts, "prompts"):
            scheduler.submit(ids, options)  # sequence i is prompt i
        return ((sequence.index, token) for sequence, token in scheduler.run())

    def complete_many(
        self,
        prompts: Sequence[str | tuple[str, str]],
        options: GenerationOptions | None = None,
        *,
        n: int = 1,
        max_batch: int = DEFAULT_MAX_BATCH,
        **changes,
    ) -> list[list[str]]:
        """The completions of many prompts, `n` samples each, run as batches of `max_batch`
        sequences: one list of `n` texts per prompt. A prompt is a prefix, or a (prefix, suffix)
        pair for fill-in-the-middle. The n samples of a prompt compute it once; sample k is
        seeded with `seed + k` when a seed is given. Stop strings end a text (and free its slot)."""
        options = GenerationOptions.of(options, **changes)
        scheduler = self.scheduler(max_batch=max_batch)
        groups = []
        for prompt in _non_empty(prompts, "prompts"):
            if isinstance(prompt, tuple) and len(prompt) != 2:
                raise SantacpuError(f"a prompt is a prefix or a (prefix, suffix) pair, got a tuple of {len(prompt)}")
            prefix, suffix = prompt if isinstance(prompt, tuple) else (prompt, None)
            groups.append(scheduler.submit(self.prompt_ids(prefix, suffix, options), self._text_options(options, suffix), n))
        pieces: list[list[str]] = [[] for group in groups for _ in group]  # by sequence index
        streams = [(StreamDecoder(self.tokenizer), StopStrings(options.stop)) for _ in pieces]
        for sequence, token in scheduler.run():
            decoder, stopper = streams[sequence.index]
            pieces[sequence.index].append(stopper.push(decoder.push(token)))
            if stopper.stopped:
                sequence.cancel()
        for text, (decoder, stopper) in zip(pieces, streams):
            text.append(stopper.push(decoder.flush()) + stopper.flush())
        return [["".join(pieces[s.index]) for s in group] for group in groups]

    def _text_options(self, options: GenerationOptions, suffix: str | None) -> GenerationOptions:
        """A FIM generation ends at a FIM special token, as the server's do."""
        return options if suffix is None else fim_options(options, self.tokenizer)

    def prompt_ids(self, prefix: str, suffix: str | None, options: GenerationOptions) -> list[int]:
        """The prompt's token ids: `prefix` alone, or a fill-in-the-middle prompt around `suffix`."""
        prefix = arguments.text(prefix, "prefix")
        if suffix is None:
            ids = build_plain_prompt(self.tokenizer, prefix, self.config.n_positions)
        else:
            suffix = arguments.text(suffix, "suffix")
            ids = build_fim_prompt(
                self.tokenizer, prefix, suffix, self.config.n_positions, options.max_new_tokens, order=options.fim_order
            )
        past = [i for i in ids if i >= self.config.vocab_size]
        if past:  # (a tokenizer that does not belong to these weights)
            raise SantacpuError(
                f"the prompt's token {past[0]} ('{errors.printable(self.tokenizer.decode([past[0]]))}') is past this "
                f"model's vocabulary of {self.config.vocab_size:,} tokens: its tokenizer ({self.tokenizer.vocab_size:,} "
                "tokens) does not fit its weights"
            )
        return ids

    def complete_stream(
        self, prefix: str, suffix: str | None = None, options: GenerationOptions | None = None, **changes
    ) -> Iterator[str]:
        """Stream the completion of `prefix` as text pieces (whole characters only). With `suffix`,
        fill in the middle between them. Stop strings (`stop`: one or several) end the text and
        are not included. Options as for `generate`."""
        options = GenerationOptions.of(options, **changes)
        ids = self.prompt_ids(prefix, suffix, options)
        return stream_text(self.tokenizer, self._generate(ids, self._text_options(options, suffix)), options.stop)

    def complete(self, prefix: str, suffix: str | None = None, options: GenerationOptions | None = None, **changes) -> str:
        """The whole completion as one string (see `complete_stream`)."""
        return "".join(self.complete_stream(prefix, suffix, options, **changes))


def _non_empty(items, name: str) -> list:
    items = list(arguments.iterable(items, name))
    if not items:
        raise SantacpuError(f"no {name} given (an empty list)")
    return items


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for `device`: "auto" is CUDA where a real GPU is usable, else the CPU;
    "cuda" without a usable GPU (or an unknown device) is a one-line error naming why. Cheap:
    callers check it before long work."""
    if device not in DEVICES:
        raise SantacpuError(f"unknown device '{device}' (choose {', '.join(DEVICES)})")
    if device == "auto":
        return "cuda" if cuda_device.gpu_missing() is None else "cpu"
    reason = cuda_device.cuda_missing() if device == "cuda" else None
    if reason is not None:
        raise SantacpuError(f"device 'cuda' is not usable: {reason}")
    return device


def choose_backend(device: str, settings: Settings) -> Backend:
    """The backend for `device` (see `resolve_device`); the CUDA package is imported only when it
    is chosen."""
    if resolve_device(device) == "cpu":
        return CpuBackend(integer_kernels=settings.integer_kernels, q8_0_int16=settings.q8_0_int16)
    from .backends.cuda.backend import CudaBackend

    return CudaBackend()


def _token_level(options: GenerationOptions | None, changes: dict, method: str) -> GenerationOptions:
    """`options` with `changes` for a method that yields token ids: text-level options (`stop`,
    `fim_order`), given as a change or in `options`, are an error there, not silently ignored."""
    merged = GenerationOptions.of(options, **changes)
    plain = GenerationOptions()
    given = [name for name in ("stop", "fim_order") if name in changes or getattr(merged, name) != getattr(plain, name)]
    if given:
        raise SantacpuError(f"{method}() yields token ids: '{given[0]}' is for complete() and complete_stream() "
                            "(stop_ids ends a stream of ids)")
    return merged


def _model_name(model: object, revision: object = None, quant: object = None) -> str:
    """`model` (a str or a path) as a str, checked: text, not empty; `revision` and `quant` text
    where given."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    model = arguments.text(model, "model")
    if not model.strip():
        raise SantacpuError("model is empty: give a hub id, a checkpoint folder or a quantized file")
    for value, name in ((revision, "revision"), (quant, "quant")):
        if value is not None:
            arguments.text(value, name)
    return model


def runnable_model(model: str | os.PathLike, revision: str | None = None, quant: str | None = None) -> tuple[str, str | None]:
    """(what to load, its revision) for `model` under the first-use policy: a quantized file as
    it is; a full-precision model as its cached quantization to `quant` (None: DEFAULT_QUANT,
    "q8_0"), made now if needed; "none": the model itself. See `quantize.cache`."""
    model = _model_name(model, revision, quant)
    if names_quantized_file(model) and quant is None:
        hub_revision(model, revision)  # a revision given for a local file is warned about
        return str(model), None  # nothing to quantize: the converter is not even imported
    from quantize.cache import runnable_model as policy

    return policy(str(model), revision, quant)


def quant_as_it_is(runnable: str | os.PathLike) -> str | None:
    """The `quant` that loads what `runnable_model` returned as it is (in a child process, a Ray
    actor): None for a quantized file, "none" for a full-precision model."""
    return None if names_quantized_file(runnable) else "none"


def load(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    quant: str | None = None,
    device: str = "auto",
    reuse_prompt: bool = True,
    kv_cache: str = "float16",
) -> Model:
    """Load a SantaCoder model: a santacpu quantized file (memory-mapped), a full-precision
    checkpoint folder (either layout; safetensors or pytorch_model.bin) or a weight file inside
    one, or a hub id such as "bigcode/santacoder" (cached by huggingface_hub). `quant`: what a
    full-precision model runs as, as on the command line: None (the default) is DEFAULT_QUANT,
    "q8_0", quantized once into the cache ($SANTACPU_CACHE) and reused; "q4_m", "q4_0", "q6_0"
    likewise; "none" runs it in full precision; a quantized file runs as it is. `reuse_prompt`:
    see `Model`. `kv_cache`: the KV cache's storage, "float16" (half the memory; rounds K and V
    to 11 significant bits) or "float32" (exact). `device`: "auto" (a CUDA GPU where one is
    usable, else the CPU), "cpu" or "cuda" (see `resolve_device`); `model.device` says which ran.
    The environment's settings (`santacpu.settings`) are read here."""
    model = _model_name(model, revision, quant)  # (checked before the long work below, as runnable_model checks it)
    if not isinstance(reuse_prompt, bool):  # ("no" would be true); checked before the (long) load
        raise SantacpuError(f"reuse_prompt must be True or False, got {reuse_prompt!r}")
    check_kv_dtype(kv_cache)  # before the (long) load
    settings = Settings.from_environment()
    backend = choose_backend(device, settings)  # a missing GPU is said before a first-use quantization
    asked, asked_revision = model, revision
    model, revision = runnable_model(asked, revision, quant)
    cached = model != asked  # (a first-use quantization's file)
    if cached or names_quantized_file(model):
        path = user_path(model)
        try:
            weights, metadata = read_quantized(path)
        except SantacpuError:
            if not cached or path.exists():
                raise
            # The cached quantization was removed (`santacpu cache clear`) between its check and
            # this read: made again.
            model, _ = runnable_model(asked, asked_revision, quant)
            path = user_path(model)
            weights, metadata = read_quantized(path)
        tokenizer = embedded_tokenizer(path, metadata)
    else:
        folder = resolve(model, revision)
        weights = read_checkpoint(folder, show_progress=True)
        tokenizer = Tokenizer.for_checkpoint(folder, weights.config.vocab_size)
    return Model(weights, tokenizer, backend, reuse_prompt=reuse_prompt, kv_cache=kv_cache)
