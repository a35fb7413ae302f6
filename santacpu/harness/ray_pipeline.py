"""The evaluation on a Ray cluster (the `ray` extra): generation is a Ray Data pipeline over an actor
pool (each actor loads the model once and runs the batch scheduler over a batch of problems), and
execution is Ray tasks, one per problem, started as the pipeline's rows stream out (each scores
its problem in the sandbox). Records reach the driver as they finish, so the results file and
`--resume` work as locally.

`--ray` starts a local cluster for the run; `--ray-address` joins an existing one (there the model
path must name the same file on every node, and santacpu must be installed on them).

May import: `santacpu.model` and the layers below it, `santacpu.harness.execute`,
`santacpu.harness.generate`, `santacpu.harness.problems`, `santacpu.harness.settings`; `ray` and
`numba` lazily.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from ..errors import SantacpuError
from .execute import score_problem
from .generate import generate_middles
from .problems import Problem
from .settings import EvalSettings

RAY_EXTRA_HINT = 'santacpu eval --ray needs the "ray" extra: pip install "santacpu[ray]"'


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise SantacpuError(f"{RAY_EXTRA_HINT} ({e.name} is missing)") from None
    return ray


@dataclasses.dataclass(frozen=True)
class RayPlacement:
    """Where the run goes: `address` None starts a local cluster; `workers` actors, each loading the
    model once and running its kernels on `threads` threads (None: the cores / workers)."""

    address: str | None = None
    workers: int = 1
    threads: int | None = None


class MiddlesActor:
    """The generation stage's actor: loads the model once, then generates batches of problems."""

    def __init__(self, model: str, revision: str | None, device: str, settings: EvalSettings, threads: int):
        import numba

        from ..model import load, quant_as_it_is

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        self.model = load(model, revision=revision, quant=quant_as_it_is(model), device=device)
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        problems = [Problem(**json.loads(text)) for text in batch["problem"]]
        out: dict[str, list[str]] = {"problem": [], "middles": []}
        for middles in generate_middles(self.model, problems, self.settings):
            out["problem"].append(json.dumps(dataclasses.asdict(middles.problem)))
            out["middles"].append(json.dumps({"texts": middles.texts, **middles.facts()}))
        return out


def _reason(error: BaseException) -> str:
    """The first santacpu error under Ray's wrappers, else the wrapper's last line."""
    seen = error
    while seen is not None:
        if isinstance(seen, SantacpuError):
            return str(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def score_remote(problem: str, middles: str, benchmark: str, timeout_s: float) -> dict:
    """The execution stage (one Ray task per problem): the problem's record."""
    facts = json.loads(middles)
    texts = facts.pop("texts")
    return score_problem(Problem(**json.loads(problem)), texts, benchmark, timeout_s, **facts)


def run_on_ray(
    model: str,
    revision: str | None,
    device: str,
    problems: Sequence[Problem],
    settings: EvalSettings,
    on_record: Callable[[dict], None],
    placement: RayPlacement,
) -> None:
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        where = f"joining the Ray cluster at {placement.address}" if placement.address else "starting a local Ray cluster"
        print(f"santacpu: {where} (this takes a while)", file=sys.stderr, flush=True)
        try:
            ray.init(
                address=placement.address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
            )
        except ConnectionError as e:
            raise SantacpuError(f"cannot join the Ray cluster at {placement.address}: {e}") from None
        except Exception as e:  # noqa: BLE001 (Ray's own start-up failures: a node that timed out, ...)
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SantacpuError(f"Ray could not start: {first_line}") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        threads = placement.threads or max(1, cpus // placement.workers)
        if placement.workers * threads > cpus:
            raise SantacpuError(
                f"{placement.workers} actors x {threads} threads need {placement.workers * threads} CPUs; the Ray "
                f"cluster has {cpus}: lower --workers or --threads-per-worker"
            )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # santacpu's own progress line counts problems
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        dataset = ray.data.from_items([{"problem": json.dumps(dataclasses.asdict(p))} for p in problems])
        with warnings.catch_warnings():
            # With restarts on, Ray's core logs an error-level caveat about every Ray Data actor
            # pool (ray-project/ray#53727); an actor that dies fails the run instead. Ray 2.60
            # names no parameter for max_restarts but the deprecated ray_remote_args.
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(
                MiddlesActor,
                fn_constructor_kwargs={
                    "model": model,
                    "revision": revision,
                    "device": device,
                    "settings": settings,
                    "threads": threads,
                },
                batch_size=max(1, 2 * settings.max_batch // settings.samples),
                concurrency=max(1, min(placement.workers, len(problems))),  # (no idle actor for a short run)
                num_cpus=threads,
                batch_format="numpy",
                max_restarts=0,
            )
        # Programs mostly wait for their interpreter to start: their tasks take no CPU from the
        # actors' reservation, and at most exec_workers run at once.
        score = ray.remote(num_cpus=0)(score_remote)
        running: list = []

        def hand_on(block: bool) -> None:
            """Records of the finished tasks (waiting for one if `block`)."""
            nonlocal running
            if block:
                done, running = ray.wait(running, num_returns=1)
            else:
                done, running = ray.wait(running, num_returns=len(running), timeout=0)
            for record in ray.get(done):
                on_record(record)

        try:
            for row in dataset.iter_rows():
                running.append(score.remote(row["problem"], row["middles"], settings.benchmark, settings.timeout_s))
                hand_on(block=len(running) > settings.exec_workers)
            while running:
                hand_on(block=True)
        except ray.exceptions.RayError as e:
            raise SantacpuError(f"the Ray run failed: {_reason(e)}") from None
    finally:
        if started:
            ray.shutdown()
