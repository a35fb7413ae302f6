"""One sequence's generation as a state machine that never runs the network itself: it is handed
the logits of what it asked to run, and answers with the tokens to emit and the tokens to run next.
The single-sequence loop (`santacpu.generation.runner`) and a batch scheduler drive it the same
way, so a sequence's output cannot depend on how its forwards were grouped.

    decoder = SequenceDecoder(prompt, options, ...)
    emitted = decoder.begin(last_prompt_logits_row)       # 0 or 1 token
    while not decoder.finished:
        step = decoder.next_inputs()                       # [token, *draft]
        emitted, rejected = decoder.advance(logits_of(step))   # drop `rejected` tokens' K/V

Stops: EOS or a stop id (not emitted), `max_new_tokens`, or the context full (n_positions tokens
of prompt and output together).

May import: numpy, `santacpu.generation.lookup`, `santacpu.generation.options`,
`santacpu.generation.sampling`, `santacpu.network.engine` (check_finite only).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..network.engine import check_finite
from .lookup import PromptLookup
from .options import GenerationOptions
from .sampling import sample_next


@dataclass
class GenerationStats:
    """What one generation did, filled in while it runs."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V were kept from an earlier sequence
    computed_tokens: int = 0  # prompt tokens run through the model (at least 1: the last one's logits)
    generated_tokens: int = 0  # tokens yielded
    decode_passes: int = 0  # forwards after the prompt: one per plain step or per verified draft
    drafted_tokens: int = 0  # prompt-lookup tokens proposed
    accepted_tokens: int = 0  # of those, the ones the model agreed with
    time_to_first_token: float | None = None  # seconds from the generation's start to its first token


class TokenChooser:
    """Picks a token from a logits row: argmax when greedy, else a sample from the sequence's own
    seeded generator. Only the first `n_valid` logits count (never the embedding's padding rows)."""

    def __init__(self, options: GenerationOptions, n_valid: int):
        self.options = options
        self.n_valid = n_valid
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, row: np.ndarray) -> int:
        valid = check_finite(row[: self.n_valid])
        o = self.options
        if o.temperature == 0.0:  # greedy without sample_next's float64 copy of the row
            return int(np.argmax(valid))
        return sample_next(row, self.n_valid, o.temperature, o.top_k, o.top_p, self.rng)


class SequenceDecoder:
    """The token-level state of one generation (see the module docstring for the protocol)."""

    def __init__(
        self,
        prompt: Sequence[int],
        options: GenerationOptions,
        *,
        eos_id: int,
        n_positions: int,
        n_valid: int,
        lookup: bool,
    ):
        self.prompt = list(prompt)
        self.options = options
        self.ends = options.stop_ids | {eos_id}
        self.total = min(n_positions, len(prompt) + options.max_new_tokens)  # positions it may fill
        self.room = self.total - len(prompt)  # tokens it may still emit
        self.choose = TokenChooser(options, n_valid)
        self.drafter = PromptLookup(prompt, options.draft_tokens) if lookup and options.temperature == 0.0 else None
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.started = time.perf_counter()
        self.finished = self.room == 0
        # Why it finished: "eos" (the model's end token), "stop_id", "limit" (max_new_tokens or
        # the context full); None while it runs.
        self.stop_reason: str | None = "limit" if self.finished else None
        self.eos_id = eos_id
        self.token: int | None = None  # chosen and emitted, not yet run through the model
        self.draft: list[int] = []

    def begin(self, row: np.ndarray) -> list[int]:
        """The prompt's last logits row [V] -> the tokens to emit (the first one, unless it ends)."""
        self.token = self.choose(row)
        self.stats.time_to_first_token = time.perf_counter() - self.started
        return self._emit([self.token])

    def next_inputs(self, most: int | None = None) -> list[int]:
        """The tokens the next forward runs: the last emitted token, then a draft (possibly none);
        at most `most` in all when given."""
        room = self.room if most is None else min(self.room, most - 1)
        self.draft = self.drafter.draft(room) if self.drafter is not None else []
        return [self.token, *self.draft]

    def advance(self, logits: np.ndarray) -> tuple[list[int], int]:
        """The logits of `next_inputs()` ([1 + len(draft), V]; [1, V] without a draft) -> (the
        tokens to emit, how many of the inputs' trailing tokens were rejected and must be dropped
        from the cache). Row i follows [token, *draft[:i]]: keep the longest agreeing run."""
        draft = self.draft
        self.stats.decode_passes += 1
        accepted = 0
        while accepted < len(draft) and self.choose(logits[accepted]) == draft[accepted]:
            accepted += 1
        if self.drafter is not None and draft:
            self.drafter.feedback(len(draft), accepted)
            self.stats.drafted_tokens += len(draft)
            self.stats.accepted_tokens += accepted
        emitted = self._emit(draft[:accepted])
        if not self.finished:
            self.token = self.choose(logits[accepted])
            emitted += self._emit([self.token])
        return emitted, len(draft) - accepted

    def _emit(self, tokens: list[int]) -> list[int]:
        """`tokens` up to the first end token, and up to the room left; sets `finished`."""
        out = []
        for token in tokens:
            if token in self.ends:
                self.finished = True
                self.stop_reason = "eos" if token == self.eos_id else "stop_id"
                break
            out.append(token)
            self.room -= 1
            if self.drafter is not None:
                self.drafter.append(token)
            if self.room == 0:
                self.finished = True
                self.stop_reason = "limit"
                break
        self.stats.generated_tokens += len(out)
        return out
