"""Many sequences at once: `BatchScheduler` runs the next tokens of every running sequence in one
batched forward (`Engine.forward_batch`: each weight read once for all of them, attention per
sequence over its own KV cache), and lets sequences join and leave between steps.

- Each sequence has its own `GenerationOptions` (sampling, seed, stops, `max_new_tokens`, prompt
  lookup) and its own KV cache, sized to what it may fill (prompt + max_new_tokens, within the
  context), allocated when it joins and freed when it leaves.
- `max_batch` sequences run at once, their caches within `max_kv_bytes`; the rest wait in a queue
  of at most `max_queue` (submitting beyond it is a `QueueFull` error, which a server turns into
  "busy, try later"). A sequence that a free slot of the batch takes at the next step does not
  count as waiting: `max_queue=0` runs what fits the batch and refuses the rest.
- A joining prompt is computed on its own (a prompt's forward already keeps every core busy), a
  chunk of PREFILL_CHUNK tokens between two batched steps, so the running sequences keep stepping between its
  chunks (a 2,000-token prompt had paused every stream for its whole computation) and a cancelled
  one stops at its next chunk, its computed prefix kept for the next prompt that shares it; then the
  sequence joins the next batched step. The chunks are the ones the engine cuts a whole prompt
  into, so the bits are a one-call prompt's. The n samples of one prompt (`submit(..., n=...)`)
  compute it once: the others copy its K/V rows (MQA keeps them small).
- `cancel()` on a sequence frees its slot at the next step.
- Prompt reuse (`keep_caches`, default 4): the caches of the last sequences that left are kept, and
  a joining prompt computes only what follows the longest token prefix it shares with one of them
  (an editor's next request, a resubmitted prompt). Kept caches yield to running sequences when
  `max_kv_bytes` is short.

Exactness: a sequence's tokens come from its own `SequenceDecoder` and its own seeded generator,
fed the logits of its own tokens; where the kernels are token-invariant (`Model.token_invariant`)
those logits are the same bits in any batch, so its output is what it gets alone.

Threads: `submit` and `cancel` may be called from any thread while one thread drives `step`/`run`
(the running sequences belong to that thread; the queue is guarded by a lock).

May import: numpy, `santacpu.arguments`, `santacpu.network`, `santacpu.generation.decoder`,
`santacpu.generation.options`, `santacpu.generation.runner` (common_prefix_length), `santacpu.errors`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .. import arguments
from ..errors import SantacpuError
from ..network.engine import PREFILL_CHUNK, Engine
from ..network.kv_cache import KVCache
from .decoder import SequenceDecoder
from .options import GenerationOptions
from .runner import common_prefix_length

DEFAULT_MAX_BATCH = 8


def _size(nbytes: int) -> str:
    """Bytes in words a message can compare: MiB, or bytes below one."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


class QueueFull(SantacpuError):
    """The scheduler's queue holds `max_queue` sequences already."""


class BatchSequence:
    """One submitted sequence: its prompt, its decoder (options, stats, state) and the tokens it
    has produced. `state` is "queued", "running", "finished" or "cancelled". The decoder (its
    prompt's lookup index: 0.7 MiB for 2,047 tokens) is made when first asked for, in practice
    when the sequence joins: n samples waiting in the queue hold their options only."""

    def __init__(self, index: int, prompt: list[int], make_decoder: Callable[[], SequenceDecoder]):
        self.index = index  # submission order, from 0 in each scheduler
        self.prompt = prompt
        self.tokens: list[int] = []
        self.state = "queued"
        self.cache: KVCache | None = None
        self._cancel_requested = False
        self._decoder: SequenceDecoder | None = None
        self._make_decoder = make_decoder

    @property
    def decoder(self) -> SequenceDecoder:
        if self._decoder is None:
            self._decoder = self._make_decoder()
            self._make_decoder = None
        return self._decoder

    @property
    def stats(self):
        return self.decoder.stats

    @property
    def done(self) -> bool:
        return self.state in ("finished", "cancelled")

    def cancel(self) -> None:
        """Stop this sequence: it produces no more tokens and its slot is freed at the next step."""
        self._cancel_requested = True


class _PromptGroup:
    """Sequences sharing one prompt (n samples): the prompt is computed for the first to join; the
    others copy its K/V rows (positions below the prompt's length are never rewritten)."""

    def __init__(self, members: list[BatchSequence]):
        self.members = deque(members)
        self.source: KVCache | None = None  # a cache holding the prompt's K/V
        self.last_row: np.ndarray | None = None  # the prompt's last logits row [V]


class BatchScheduler:
    """Continuous batching over one model's engine (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        make_decoder: Callable[[Sequence[int], GenerationOptions], SequenceDecoder],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_kv_bytes: int | None = None,
        max_queue: int | None = None,
        keep_caches: int = 4,
    ):
        if max_batch < 1:
            raise SantacpuError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.make_decoder = make_decoder
        self.max_batch = max_batch
        self.max_kv_bytes = max_kv_bytes
        self.max_queue = max_queue
        self._queue: deque[_PromptGroup] = deque()
        self._running: list[BatchSequence] = []
        self.keep_caches = keep_caches
        self._kept: list[KVCache] = []  # caches of sequences that left, the latest first
        self._lock = threading.Lock()
        self._submitted = 0
        self._unjoined: list[BatchSequence] = []  # taken to join when a prompt's computation raised
        # Taken off the queue, joining: the first's prompt is being computed, a chunk between batched steps.
        self._joining: deque[tuple[BatchSequence, _PromptGroup]] = deque()
        self._chunk_since_step = False  # a prompt chunk ran since the last batched step
        self._undelivered: deque[tuple[BatchSequence, int]] = deque()  # `run`'s tokens not yet yielded
        self._broken: str | None = None  # why a step raised: nothing runs until `abandon`

    def kv_bytes(self, capacity: int) -> int:
        """Bytes of one sequence's KV cache with room for `capacity` positions."""
        c = self.engine.config
        return 2 * c.n_layer * capacity * c.n_kv_head * c.head_dim * self.engine.kv_dtype.itemsize

    def submit(
        self, ids: Sequence[int], options: GenerationOptions | None = None, n: int = 1, **changes
    ) -> list[BatchSequence]:
        """Queue `n` sequences of the prompt `ids` under `options` with `changes` applied (as for
        `Model.generate`); sample k of n is seeded with `seed + k` when a seed is given, so sample 0
        is what `generate` gives alone. Errors: a bad prompt or option, the prompt does not fit
        the context, one sequence's cache alone exceeds `max_kv_bytes`, n exceeds what the batch and
        the queue hold together, or the queue is full (QueueFull)."""
        self._refuse_if_broken()
        options = GenerationOptions.of(options, **changes)
        n = arguments.integer(n, "n", minimum=1)
        if self.max_queue is not None and n > self.max_batch + self.max_queue:  # (a full queue would say "later")
            raise SantacpuError(
                f"n = {n} samples are more than this scheduler ever holds at once: max_batch {self.max_batch} + "
                f"max_queue {self.max_queue}"
            )
        first = self.make_decoder(ids, options)  # the prompt and options checked, once for all n
        if self.max_kv_bytes is not None and self.kv_bytes(first.total) > self.max_kv_bytes:
            raise SantacpuError(
                f"one sequence of {first.total} positions needs {_size(self.kv_bytes(first.total))} of KV cache, "
                f"more than max_kv_bytes ({_size(self.max_kv_bytes)})"
            )

        def maker(k: int) -> Callable[[], SequenceDecoder]:  # sample k is seeded seed + k
            sample = options if options.seed is None else dataclasses.replace(options, seed=options.seed + k)
            return lambda: self.make_decoder(first.prompt, sample)

        with self._lock:
            queued = sum(len(g.members) for g in self._queue)
            free_slots = max(0, self.max_batch - len(self._running) - len(self._joining))
            waiting = max(0, queued - free_slots)
            if self.max_queue is not None and queued + n - free_slots > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({waiting} sequences waiting beyond the batch of {self.max_batch}, "
                    f"max_queue {self.max_queue})"
                )
            sequences = [BatchSequence(self._submitted + k, first.prompt, maker(k)) for k in range(n)]
            sequences[0]._decoder = first
            self._submitted += n
            self._queue.append(_PromptGroup(sequences))
        return sequences

    @property
    def pending(self) -> bool:
        """Whether any sequence is queued, joining or running."""
        with self._lock:
            return bool(self._queue or self._running or self._joining)

    @property
    def running(self) -> list[BatchSequence]:
        return list(self._running)

    @property
    def queued(self) -> int:
        with self._lock:
            return sum(len(g.members) for g in self._queue)

    def admit(self) -> list[tuple[BatchSequence, list[int]]]:
        """Drop cancelled sequences and let waiting ones join while they fit: each joining prompt is
        computed (or copied from its group) and its first token chosen. Returns (sequence, tokens)
        for each sequence that joined or was dropped. `step` calls it first; a caller that wants
        first tokens out before the batched forward calls it on its own."""
        self._refuse_if_broken()
        events: list[tuple[BatchSequence, list[int]]] = []
        self._drop_cancelled(events)
        if not self._joining:
            self._joining.extend(self._take_admissible())
        while self._joining:
            sequence, group = self._joining[0]
            computes = group.source is None and not sequence.decoder.finished
            if computes and self._chunk_since_step and any(not s.decoder.finished for s in self._running):
                break  # after a long prompt's chunk, the running sequences step first
            # (Short prompts still join together, as a burst of requests did.)
            long = sequence.cache is not None or len(sequence.prompt) > PREFILL_CHUNK
            self._chunk_since_step = self._chunk_since_step or (computes and long)
            try:
                joined = self._join(sequence, group)  # outside the lock: submit need not wait for a prompt
            except BaseException as problem:
                self._unjoined = [s for s, _ in self._joining]  # off the queue, not running: `abandon` ends them
                self._joining.clear()
                self._broken = type(problem).__name__
                raise
            if not joined:
                break  # one chunk of its prompt computed: the running sequences step before the next
            self._joining.popleft()
            events.append((sequence, sequence.tokens[:]))
        return events

    def step(self) -> list[tuple[BatchSequence, list[int]]]:
        """`admit`, then one batched forward over every running sequence's next tokens. Returns
        (sequence, tokens it emitted) once for each sequence that joined, emitted or ended: one that
        joined in this step and stepped too has its first token and the step's in one event (a
        caller that ends a sequence's output at its first event once it is done lost the rest)."""
        events = self.admit()
        stepping = [s for s in self._running if not s.decoder.finished]
        try:
            for part in self._forward_parts(stepping):
                inputs = [i for _, i in part]
                logits = self.engine.forward_batch([s.cache for s, _ in part], inputs, [len(i) > 1 for i in inputs])
                for (sequence, _), rows in zip(part, logits):
                    emitted, rejected = sequence.decoder.advance(rows)
                    if rejected:
                        sequence.cache.truncate(sequence.cache.length - rejected)
                    sequence.tokens += emitted
                    events.append((sequence, emitted))
        except BaseException as problem:  # (Ctrl-C mid-forward): caches hold K/V their decoders never saw
            self._broken = type(problem).__name__
            raise
        if stepping:
            self._chunk_since_step = False
        merged: dict[int, tuple[BatchSequence, list[int]]] = {}
        for sequence, tokens in events:
            merged.setdefault(id(sequence), (sequence, []))[1].extend(tokens)
        for sequence in [s for s in self._running if s.decoder.finished]:
            self._leave(sequence, "finished")
            merged.setdefault(id(sequence), (sequence, []))  # ended at its first token: its end is news too
        return list(merged.values())

    def run(self) -> Iterator[tuple[BatchSequence, int]]:
        """Step until nothing is queued or running: (sequence, token) as they come. A run left
        early (`break`) loses nothing: the next `run` yields the rest of that step's tokens first."""
        while self._undelivered or self.pending:
            for events in (self.admit, self.step):  # first tokens out before the batched forward
                if not self._undelivered:
                    self._undelivered.extend((sequence, t) for sequence, tokens in events() for t in tokens)
                while self._undelivered:
                    yield self._undelivered.popleft()

    @staticmethod
    def _forward_parts(stepping: list[BatchSequence]) -> list[list[tuple[BatchSequence, list[int]]]]:
        """(sequence, its next inputs) of `stepping`, in parts whose inputs fit one batched forward
        (PREFILL_CHUNK tokens: a max_batch past it, or wide drafts). Splitting changes no token:
        each sequence's logits are its own, in any batch the kernels are token-invariant in."""
        parts: list[list[tuple[BatchSequence, list[int]]]] = []
        part: list[tuple[BatchSequence, list[int]]] = []
        tokens = 0
        for sequence in stepping:
            inputs = sequence.decoder.next_inputs(PREFILL_CHUNK)
            if part and tokens + len(inputs) > PREFILL_CHUNK:
                parts.append(part)
                part, tokens = [], 0
            part.append((sequence, inputs))
            tokens += len(inputs)
        if part:
            parts.append(part)
        return parts

    def _refuse_if_broken(self) -> None:
        if self._broken is not None:
            raise SantacpuError(f"this scheduler's step was interrupted ({self._broken}): its caches cannot be "
                                "trusted; abandon() ends its sequences, after which it runs again")

    def abandon(self) -> list[tuple[BatchSequence, list[int]]]:
        """End every running and queued sequence now, as cancelled, and forget the kept caches:
        after a step that raised, no cache's state can be trusted. Returns (sequence, []) for each."""
        events: list[tuple[BatchSequence, list[int]]] = []
        for sequence in list(self._running):
            sequence.cancel()
        with self._lock:
            for group in self._queue:
                for sequence in group.members:
                    sequence.cancel()
        self._drop_cancelled(events)
        for sequence, _ in self._joining:
            sequence.state = "cancelled"
            events.append((sequence, []))
        self._joining.clear()
        for sequence in self._unjoined:
            sequence.state = "cancelled"
            events.append((sequence, []))
        self._unjoined = []
        self._kept.clear()
        self._undelivered.clear()
        self._broken = None
        return events

    def _drop_cancelled(self, events) -> None:
        for sequence in [s for s in self._running if s._cancel_requested]:
            self._leave(sequence, "cancelled")
            events.append((sequence, []))
        for joining in [j for j in self._joining if j[0]._cancel_requested]:
            self._joining.remove(joining)
            sequence = joining[0]
            sequence.state = "cancelled"
            if self.keep_caches and sequence.cache is not None:  # what its chunks computed serves the next prompt
                self._kept.insert(0, sequence.cache)
                del self._kept[self.keep_caches :]
            sequence.cache = None
            events.append((sequence, []))
        with self._lock:
            for group in list(self._queue):
                for sequence in [s for s in group.members if s._cancel_requested]:
                    group.members.remove(sequence)
                    sequence.state = "cancelled"
                    events.append((sequence, []))
                if not group.members:
                    self._queue.remove(group)

    def _leave(self, sequence: BatchSequence, state: str) -> None:
        self._running.remove(sequence)
        sequence.state = state
        if self.keep_caches and sequence.cache is not None:
            self._kept.insert(0, sequence.cache)
            del self._kept[self.keep_caches :]
        sequence.cache = None  # freed, unless kept or a waiting sample of its prompt copies from it

    def _take_admissible(self) -> list[tuple[BatchSequence, _PromptGroup]]:
        """Take from the queue, in order, the sequences that fit beside the running ones: at most
        max_batch in all, their caches within max_kv_bytes (a sequence alone always fits)."""
        taken = []
        used = sum(s.cache.nbytes for s in self._running)
        count = len(self._running)
        with self._lock:
            while self._queue and count < self.max_batch:
                group = self._queue[0]
                need = self.kv_bytes(group.members[0].decoder.total)
                if self.max_kv_bytes is not None:
                    while self._kept and used + sum(c.nbytes for c in self._kept) + need > self.max_kv_bytes:
                        self._kept.pop()  # kept caches yield to sequences that run
                    if count and used + need > self.max_kv_bytes:
                        break  # waits for memory to be freed
                taken.append((group.members.popleft(), group))
                if not group.members:
                    self._queue.popleft()
                used, count = used + need, count + 1
        return taken

    def _reusable(self, prompt: list[int], capacity: int) -> KVCache:
        """A cache for `prompt` of at least `capacity` positions: the kept one sharing the longest
        prefix with it, truncated to that prefix (never the whole prompt: its last token's logits
        are needed), else a new one."""
        best, best_length = None, 0
        for kept in self._kept:
            length = min(common_prefix_length(kept.ids, prompt), len(prompt) - 1)
            if length > best_length:
                best, best_length = kept, length
        if best is None:
            return self.engine.new_cache(capacity)
        self._kept.remove(best)
        best.truncate(best_length)
        return best if best.capacity >= capacity else best.resized(capacity)

    def _join(self, sequence: BatchSequence, group: _PromptGroup) -> bool:
        """Give `sequence` its cache with the prompt's K/V (computed, or copied from its group's
        first member) and its first token; False where one more chunk of its prompt was computed
        and more remain."""
        decoder = sequence.decoder
        if decoder.finished:  # max_new_tokens = 0: not even the prompt runs
            sequence.state = "finished"
            return True
        prompt = sequence.prompt
        if group.source is None:
            if sequence.cache is None:  # its first chunk
                sequence.cache = self._reusable(prompt, decoder.total)
                decoder.stats.reused_tokens = sequence.cache.length
            cache = sequence.cache
            rest = prompt[cache.length :]
            row = self.engine.forward(cache, rest[:PREFILL_CHUNK])[-1]
            if len(rest) > PREFILL_CHUNK:
                return False
            group.last_row = row
            group.source = cache
            decoder.stats.computed_tokens = len(prompt) - decoder.stats.reused_tokens
        else:
            cache = self.engine.new_cache(decoder.total)
            cache.copy_prefix_from(group.source, len(prompt))
            decoder.stats.reused_tokens = len(prompt)
        sequence.cache = cache
        sequence.state = "running"
        self._running.append(sequence)
        sequence.tokens += decoder.begin(group.last_row)
        return True
