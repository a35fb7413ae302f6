"""`GenerationOptions`: how one sequence is generated, as one object that the Python API, the CLI,
the batch scheduler and the tools all take, checked in one place.

May import: `santacpu.arguments`, `santacpu.errors`, `santacpu.generation.lookup`,
`santacpu.generation.prompts`, `santacpu.generation.sampling`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import arguments
from ..errors import SantacpuError
from .lookup import DEFAULT_DRAFT_TOKENS
from .prompts import FIM_ORDERS
from .sampling import check_sampling

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class GenerationOptions:
    """Everything that decides one generation's output besides the prompt.

    - `max_new_tokens`: at most this many tokens (fewer when the context, n_positions tokens of
      prompt and output together, fills first).
    - `temperature` 0 is greedy; above 0 samples, after `top_k` (0: off) and `top_p` (1: off).
    - `seed`: the sampling generator's seed; None draws a fresh one. One seed gives one output.
    - `stop`: text-level stop strings (the text methods end the text before the first one);
      `stop_ids`: token ids that end the stream unyielded, as EOS does.
    - `fim_order`: "psm" or "spm", the fill-in-the-middle prompt's order (text methods with a
      suffix).
    - `lookup`: under greedy decoding, draft up to `draft_tokens` tokens by prompt lookup and
      verify them in one forward (the output is plain greedy decoding's). None: on where the
      model's kernels are token-invariant (`Model.token_invariant`), else off.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    fim_order: str = "psm"
    lookup: bool | None = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **changes) -> GenerationOptions:
        """`options` (default: the defaults) with `changes` applied, checked. An unknown name is a
        TypeError, as for any function's keyword."""
        base = cls() if options is None else options
        if not isinstance(base, GenerationOptions):
            raise SantacpuError(f"options must be a GenerationOptions, got {type(base).__name__}")
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected generation option '{unknown[0]}'")
        return dataclasses.replace(base, **changes).checked()

    def checked(self) -> GenerationOptions:
        """These options with every value of the right type and range (ints as int, stop strings
        as a tuple), or a SantacpuError naming the wrong one."""
        temperature, top_k, top_p = check_sampling(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.fim_order, str) or self.fim_order not in FIM_ORDERS:  # (a typo must not pass silently)
            shown = f"'{self.fim_order}'" if isinstance(self.fim_order, str) else f"of type {type(self.fim_order).__name__}"
            raise SantacpuError(f"unknown FIM order {shown} (choose {' or '.join(FIM_ORDERS)})")
        if not (self.lookup is None or isinstance(self.lookup, bool)):  # (1 == True)
            raise SantacpuError(f"lookup must be True, False or None, got {self.lookup!r}")
        return dataclasses.replace(
            self,
            max_new_tokens=arguments.integer(self.max_new_tokens, "max_new_tokens", minimum=0),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=arguments.seed(self.seed),
            stop=tuple(arguments.stop_strings(self.stop)),
            stop_ids=frozenset(arguments.integer(i, "each stop id") for i in arguments.iterable(self.stop_ids, "stop_ids")),
            draft_tokens=arguments.integer(self.draft_tokens, "draft_tokens", minimum=1),
        )
