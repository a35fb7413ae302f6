"""The evaluation on this machine: generation on the calling thread (the model's kernels use every
core), each sample's program executed meanwhile by a small thread pool (each in its own sandboxed
process), and a problem's record handed on as soon as its last program ends, from the pool's
thread (a finished problem is kept even while the next one is generated). Ctrl-C stops the
programs still running within a tenth of a second; what finished is kept.

May import: `santacpu.model`, `santacpu.harness.execute`, `santacpu.harness.generate`,
`santacpu.harness.problems`, `santacpu.harness.sandbox`, `santacpu.harness.settings`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ..model import Model
from .execute import programs_of, record_of
from .generate import generate_middles
from .problems import Problem
from .sandbox import SandboxLimits, SandboxStopped, run_program
from .settings import EvalSettings


def run_local(model: Model, problems: Sequence[Problem], settings: EvalSettings, on_record: Callable[[dict], None]) -> None:
    pool = ThreadPoolExecutor(settings.exec_workers, thread_name_prefix="santacpu-eval")
    limits = SandboxLimits(timeout_s=settings.timeout_s)
    stop = threading.Event()
    lock = threading.Lock()  # (on_record is called from the pool's threads: one at a time)
    failures: list[BaseException] = []
    runs: list[Future] = []
    ended_here = [False]  # interrupted: no record is handed on after run_local has left

    def check() -> None:
        with lock:
            if failures:
                raise failures[0]

    try:
        for middles in generate_middles(model, problems, settings):
            check()
            completions, programs = programs_of(middles.problem, middles.texts, settings.benchmark)
            futures = [pool.submit(run_program, source, limits, stop) for source in programs]
            left = [len(futures)]

            def ended(_: Future, problem=middles.problem, completions=completions, futures=futures, left=left,
                      facts=middles.facts()) -> None:
                with lock:
                    left[0] -= 1
                    if left[0] or failures or ended_here[0]:
                        return
                    try:
                        on_record(record_of(problem, completions, [f.result() for f in futures], **facts))
                    except SandboxStopped:
                        pass  # (interrupted: the problem is done again on --resume)
                    except BaseException as error:  # noqa: BLE001 (raised on the calling thread, by check())
                        if threading.current_thread() is threading.main_thread() and not isinstance(error, Exception):
                            raise  # (Ctrl-C while a done future's callback ran here: on up at once)
                        failures.append(error)

            runs.extend(futures)
            for future in futures:
                future.add_done_callback(ended)
        pool.shutdown(wait=True)  # (every program run, and every record handed on)
    except BaseException:
        stop.set()  # the programs still running end now; the problems that finished are kept
        pool.shutdown(wait=False, cancel_futures=True)
        # The runs themselves, not the threads' join: an interrupted join (Python < 3.13) leaves
        # the threads marked as ended, and the interpreter then exits with programs still running.
        wait(runs)
        with lock:  # (a record being written is finished; none is begun after this)
            ended_here[0] = True
        raise
    check()
