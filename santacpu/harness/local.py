"""The evaluation on this machine: generation on the calling thread (the model's kernels use every
core), the programs of finished problems executed meanwhile by a small thread pool (each in its own
sandboxed process), each record handed on as soon as its problem is scored.

May import: `santacpu.model`, `santacpu.harness.execute`, `santacpu.harness.generate`,
`santacpu.harness.problems`, `santacpu.harness.settings`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ..model import Model
from .execute import score_problem
from .generate import generate_middles
from .problems import Problem
from .settings import EvalSettings


def run_local(model: Model, problems: Sequence[Problem], settings: EvalSettings, on_record: Callable[[dict], None]) -> None:
    pool = ThreadPoolExecutor(settings.exec_workers, thread_name_prefix="santacpu-eval")
    running: set[Future] = set()

    def hand_on(done) -> None:
        for future in done:
            running.discard(future)
            on_record(future.result())

    try:
        for middles in generate_middles(model, problems, settings):
            running.add(
                pool.submit(
                    score_problem,
                    middles.problem,
                    middles.texts,
                    settings.benchmark,
                    settings.timeout_s,
                    **middles.facts(),
                )
            )
            hand_on([f for f in running if f.done()])
        while running:
            hand_on(wait(running, return_when=FIRST_COMPLETED).done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
