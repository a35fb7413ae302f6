"""`EvalSettings`: everything that decides an evaluation's results (and what else shapes its run),
checked in one place.

May import: `santacpu.arguments`, `santacpu.errors`, `santacpu.generation.options`,
`santacpu.harness.problems`, `santacpu.harness.scoring`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import arguments
from ..errors import OptionValueError
from ..generation.options import GenerationOptions
from .problems import check_benchmark
from .scoring import DEFAULT_KS

DEFAULT_EVAL_MAX_NEW_TOKENS = 128
DEFAULT_TIMEOUT_S = 3.0  # the reference harness's


MAX_SAMPLES = 1000  # completions of one problem


@dataclass(frozen=True)
class EvalSettings:
    """- `benchmark`: single-line, multi-line, random-span or random-span-light.
    - `samples` completions of each problem; `ks`: the k of pass@k (None: those of 1, 10, 100 that
      are at most `samples`).
    - `temperature` 0 is greedy (then `samples` must be 1); `top_p` nucleus sampling; `seed`: the
      base seed (a problem's sample k is seeded from it, its task id and k, whatever runs beside it).
    - `max_new_tokens` per completion; `fim_order` psm or spm.
    - `limit`: the first N problems only; `timeout_s`: each program's wall-clock limit.
    - `max_batch`: sequences generated at once; `exec_workers`: programs run at once.
    """

    benchmark: str = "single-line"
    samples: int = 1
    ks: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = DEFAULT_EVAL_MAX_NEW_TOKENS
    fim_order: str = "psm"
    limit: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_batch: int = 8
    exec_workers: int = 2

    def checked(self) -> EvalSettings:
        check_benchmark(self.benchmark)
        samples = arguments.integer(self.samples, "samples", minimum=1)
        if samples > MAX_SAMPLES:  # (each problem's samples are held, and their programs run, at once)
            raise OptionValueError(f"samples must be at most {MAX_SAMPLES} (the reference harness uses 200), got {samples}")
        ks = tuple(k for k in DEFAULT_KS if k <= samples) if self.ks is None else tuple(self.ks)
        for k in ks:
            k = arguments.integer(k, "k", minimum=1)
            if k > samples:
                raise OptionValueError(f"pass@{k} needs at least {k} samples of each problem (--samples is {samples})")
        if not ks:
            raise OptionValueError("no k given for pass@k")
        generation = self.generation_options()  # checks temperature, top_p, seed, max_new_tokens, fim_order
        if generation.temperature == 0 and samples > 1:
            raise OptionValueError(
                f"greedy decoding (temperature 0) gives one completion {samples} times: sample with --temperature > 0, "
                "or use --samples 1"
            )
        if self.timeout_s is None or not 0 < float(self.timeout_s) <= 3600:
            raise OptionValueError(f"timeout must be above 0 and at most 3600 seconds, got {self.timeout_s}")
        return dataclasses.replace(
            self,
            samples=samples,
            ks=tuple(sorted(set(ks))),
            limit=None if self.limit is None else arguments.integer(self.limit, "limit", minimum=1),
            timeout_s=float(self.timeout_s),
            max_batch=arguments.integer(self.max_batch, "max_batch", minimum=1),
            exec_workers=arguments.integer(self.exec_workers, "exec_workers", minimum=1),
        )

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions.of(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            fim_order=self.fim_order,
        )

    def identity(self) -> dict:
        """What a results file must agree on to be resumed with these settings."""
        return {
            "benchmark": self.benchmark,
            "samples": self.samples,
            "options": {
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
                "max_new_tokens": self.max_new_tokens,
                "fim_order": self.fim_order,
            },
            "timeout_s": self.timeout_s,
        }
