"""The model's middles for HumanEval-infilling problems: each problem's FIM prompt, its n samples
through the model's batch scheduler (the prompt computed once for all n, problems joining as
others finish), each sample's text ended where its span ends.

Seeds: a problem's generation is seeded from the base seed and its task id (sample k adds k, the
scheduler's rule), so its completions do not depend on which problems run beside it, on which
machine or in which order.

May import: `santacpu.model` and the layers below it, `santacpu.harness.problems`,
`santacpu.harness.scoring`, `santacpu.harness.settings`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..generation.options import GenerationOptions
from ..generation.prompts import fim_prompt_of_text
from ..model import Model
from ..tokenizer import StreamDecoder
from .problems import Problem
from .scoring import span_ended
from .settings import EvalSettings


@dataclass
class Middles:
    """One problem's generated texts (raw: not yet cut to the span) and what its prompt cost."""

    problem: Problem
    texts: list[str]
    prompt_tokens: int
    computed_tokens: int  # prompt tokens run through the model for all samples together
    truncated: bool  # the prompt lost part of its prefix or suffix to fit the context

    def facts(self) -> dict:
        """What the result record keeps of the prompt."""
        return {"prompt_tokens": self.prompt_tokens, "computed_tokens": self.computed_tokens, "truncated": self.truncated}


def problem_prompt(model: Model, problem: Problem, options: GenerationOptions) -> tuple[list[int], bool]:
    """The problem's FIM prompt ids, and whether the context made it drop text."""
    return fim_prompt_of_text(
        model.tokenizer, problem.prefix, problem.suffix, model.config.n_positions, options.max_new_tokens,
        order=options.fim_order,
    )


def problem_options(settings: EvalSettings, problem: Problem) -> GenerationOptions:
    seed = (settings.seed + zlib.crc32(problem.task_id.encode())) % 2**63
    return dataclasses.replace(settings.generation_options(), seed=seed)


class _Sample:
    def __init__(self, model: Model):
        self.decoder = StreamDecoder(model.tokenizer)
        self.text = ""


def generate_middles(model: Model, problems: Sequence[Problem], settings: EvalSettings) -> Iterator[Middles]:
    """Each problem's middles, in the order problems finish. At most `settings.max_batch`
    sequences run at once; a few problems more wait in the scheduler's queue."""
    scheduler = model.scheduler(max_batch=settings.max_batch)
    waiting = list(reversed(problems))
    ahead = max(2, 2 * settings.max_batch // settings.samples)  # problems submitted but not finished
    groups: dict[int, tuple[Middles, list]] = {}  # by the first sample's index
    samples: dict[int, _Sample] = {}  # by sequence index
    while waiting or groups:
        while waiting and len(groups) < ahead:
            problem = waiting.pop()
            options = problem_options(settings, problem)
            ids, truncated = problem_prompt(model, problem, options)
            sequences = scheduler.submit(ids, options, settings.samples)
            key = sequences[0].index
            groups[key] = (Middles(problem, [], len(ids), 0, truncated), sequences)
            for sequence in sequences:
                samples[sequence.index] = _Sample(model)
        if not scheduler.pending:
            raise RuntimeError("the scheduler ran dry with problems unfinished")
        for events in (scheduler.admit, scheduler.step):
            for sequence, tokens in events():
                sample = samples[sequence.index]
                sample.text += "".join(sample.decoder.push(t) for t in tokens)
                if not sequence.done and span_ended(sample.text, settings.benchmark):
                    sequence.cancel()  # the rest cannot change the scored span
        for key in [k for k, (_, sequences) in groups.items() if all(s.done for s in sequences)]:
            middles, sequences = groups.pop(key)
            for sequence in sequences:
                sample = samples.pop(sequence.index)
                middles.texts.append(sample.text + sample.decoder.flush())
                middles.computed_tokens += sequence.stats.computed_tokens
            yield middles
