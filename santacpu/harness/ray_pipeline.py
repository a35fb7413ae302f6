"""The evaluation on a Ray cluster (the `ray` extra): generation is a Ray Data pipeline over an actor
pool (each actor loads the model once and runs the batch scheduler over a batch of problems), and
execution is Ray tasks, one per problem, started as the pipeline's rows stream out (each scores
its problem in the sandbox). Records reach the driver as they finish, so the results file and
`--resume` work as locally.

`--ray` starts a local cluster for the run; `--ray-address` joins an existing one (there the model
path must name the same file on every node, and santacpu must be installed on them). Before Ray
is asked to join, the address must answer in HTTP/2, as a cluster's GCS (gRPC) does: Ray retries
any address that does not for many minutes.

May import: `santacpu.model` and the layers below it, `santacpu.harness.execute`,
`santacpu.harness.generate`, `santacpu.harness.problems`, `santacpu.harness.settings`; `ray`,
`h2` (the `ray` extra's) and `numba` lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence

from ..errors import OptionValueError, SantacpuError, os_problem
from .execute import score_problem
from .generate import generate_middles
from .problems import Problem
from .settings import EvalSettings

RAY_EXTRA_HINT = 'santacpu eval --ray needs the "ray" extra: pip install "santacpu[ray]"'


def require_ray():
    # A Ray call from a thread after the run's ray.shutdown() (the rows thread of an interrupted
    # run) would start another local cluster; only the run's own ray.init starts one.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
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

    def checked(self) -> RayPlacement:
        """The placement, its address refused in one line unless HOST:PORT or "auto" (the cluster
        `ray start` began on this machine): santacpu joins as a driver, through the cluster's GCS,
        not through Ray Client (ray://) or a URL."""
        if self.address is None:
            return self
        address = self.address.strip()
        if not address:
            raise OptionValueError("--ray-address is empty: give the cluster's address, or --ray for a cluster of the run's own")
        if address == "auto":
            return dataclasses.replace(self, address=address)
        head = "its head node's HOST:PORT as `ray start --head` prints it (port 6379 by default)"
        scheme, found, _ = address.partition("://")
        if found:
            kind = "a Ray Client address" if scheme == "ray" else "a URL"
            raise OptionValueError(f"--ray-address {address} is {kind}: santacpu joins a cluster as a driver, so give {head}")
        if _host_port(address) is None:
            raise OptionValueError(f"--ray-address {address} is not HOST:PORT: give {head}, or auto")
        return dataclasses.replace(self, address=address)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address (an IPv6 host without its brackets), or None where
    `address` is not one (as "auto")."""
    host, _, port = address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


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


def _check_answers_as_ray(address: str, timeout_s: float = 10.0) -> None:
    """Fail in one line, within about `timeout_s`, unless something at a cluster's HOST:PORT
    answers an HTTP/2 connection's start with its settings, as Ray's GCS (gRPC) does: nothing
    listening, a service of another kind (a web server, the dashboard's port) and one that says
    nothing are all refused here, where Ray would retry them for many minutes."""
    where = _host_port(address)
    if where is None:
        return  # ("auto": Ray finds the machine's cluster itself)
    try:
        import h2.config
        import h2.connection
        import h2.events
        import h2.exceptions
    except ImportError as e:
        raise SantacpuError(f"{RAY_EXTRA_HINT} ({e.name} is missing)") from None
    deadline = time.monotonic() + timeout_s
    try:
        connection = socket.create_connection(where, timeout=timeout_s)
    except (OSError, ValueError) as e:
        raise SantacpuError(f"cannot reach the Ray cluster at {address}: {os_problem(e) if isinstance(e, OSError) else e}") from None
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    answered = False
    with connection:
        try:
            client.initiate_connection()
            connection.sendall(client.data_to_send())
            while not answered:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                reply = connection.recv(65536)
                if not reply:
                    break  # closed
                answered = any(isinstance(event, h2.events.RemoteSettingsChanged) for event in client.receive_data(reply))
        except TimeoutError:
            raise SantacpuError(f"{address} took the connection but said nothing in {timeout_s:g} s: it is not a Ray "
                                f"cluster's address (`ray start --head` prints it; port 6379 by default)") from None
        except (OSError, h2.exceptions.ProtocolError):
            pass  # (reset, or not HTTP/2: not answered)
    if not answered:
        raise SantacpuError(f"{address} answers, but not as a Ray cluster: give its head node's address "
                            f"(`ray start --head` prints it; port 6379 by default)")


@contextlib.contextmanager
def _core_lines_kept():
    """Standard error (the file descriptor) into a temporary file while `ray.init` runs, its lines
    given to the caller afterwards: Ray's core writes a warning a second there while a cluster
    refuses the connection, which santacpu turns into one line of its own. Processes started
    meanwhile (a local cluster's) write their own log files."""
    lines: list[str] = []
    sys.stderr.flush()
    kept = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(kept, 2)
                capture.seek(0)
                lines += capture.read(1 << 20).decode("utf-8", "replace").splitlines()
    finally:
        os.close(kept)


class _ClusterWatch:
    """Whether the cluster's GCS at HOST:PORT still takes connections, asked every `every_s`
    seconds: `check()` fails in one line once it has refused them for `silent_s`. Ray itself
    notices only after 60 s, and then ends the process with a line of its own."""

    def __init__(self, gcs_address: str, every_s: float = 2.0, silent_s: float = 10.0):
        self.address, self.host_port = gcs_address, _host_port(gcs_address)
        self.every_s, self.silent_s = every_s, silent_s
        self.asked = self.silent_since = None

    def check(self) -> None:
        now = time.monotonic()
        if self.asked is not None and now - self.asked < self.every_s:
            return
        self.asked = now
        try:
            socket.create_connection(self.host_port, timeout=1.0).close()
            self.silent_since = None
        except OSError:
            self.silent_since = self.silent_since or now
            if now - self.silent_since >= self.silent_s:
                raise SantacpuError(
                    f"the Ray cluster at {self.address} stopped answering: the "
                    "problems finished so far are kept in the results file, and --resume continues the run"
                ) from None


def _watched_address(ray, given: str | None) -> str:
    """HOST:PORT that shows whether the cluster is still there: the one given, which has just
    answered from here (the GCS may know itself by another address), else the GCS of the cluster
    the run started or Ray found ("auto")."""
    return given if given and _host_port(given) else ray.get_runtime_context().gcs_address


def _drive(ray, dataset, score, settings: EvalSettings, on_record: Callable[[dict], None],
           watch: _ClusterWatch | None = None) -> None:
    """Start a problem's execution task as its row streams out of `dataset` (at most exec_workers
    at once), and hand on each record as soon as its task ends, also while the next row is still
    being generated (rows are read on a thread of their own); `watch` is checked meanwhile."""
    rows: queue.Queue = queue.Queue()

    def read_rows() -> None:
        try:
            for row in dataset.iter_rows():
                rows.put(("row", row))
            rows.put(("end", None))
        except BaseException as error:  # noqa: BLE001 (raised on the driver's thread)
            rows.put(("error", error))

    threading.Thread(target=read_rows, name="santacpu-ray-rows", daemon=True).start()
    waiting: list = []  # rows whose task has not started yet
    running: list = []
    ended = False
    while not ended or waiting or running:
        if watch:
            watch.check()
        while True:  # every row there is now (or, with nothing else to wait for, the next within 1 s)
            try:
                kind, value = rows.get(timeout=1.0) if not ended and not waiting and not running else rows.get_nowait()
            except queue.Empty:
                break
            if kind == "error":
                raise value
            if kind == "end":
                ended = True
                break
            waiting.append(value)
        while waiting and len(running) < settings.exec_workers:
            row = waiting.pop(0)
            running.append(score.remote(row["problem"], row["middles"], settings.benchmark, settings.timeout_s))
        if running:
            try:
                done, running = ray.wait(running, num_returns=1, timeout=0.1)
            except SystemError as error:  # Ctrl-C (or SIGTERM) inside Ray's compiled wait comes out as this
                cause = error.__cause__
                if isinstance(cause, BaseException) and not isinstance(cause, Exception):
                    raise cause from None
                raise
            for record in ray.get(done):
                on_record(record)


def run_on_ray(
    model: str,
    revision: str | None,
    device: str,
    problems: Sequence[Problem],
    settings: EvalSettings,
    on_record: Callable[[dict], None],
    placement: RayPlacement,
) -> None:
    """Generate and score `problems` on Ray as `placement` says (checked: `RayPlacement.checked`),
    handing each record to `on_record` as it finishes."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        if placement.address:
            _check_answers_as_ray(placement.address)
        where = f"joining the Ray cluster at {placement.address}" if placement.address else "starting a local Ray cluster"
        print(f"santacpu: {where} (this takes a while)", file=sys.stderr, flush=True)
        on_term = signal.getsignal(signal.SIGTERM)
        try:
            with _core_lines_kept() as core_lines:
                ray.init(
                    # "local": a cluster of the run's own, even where RAY_ADDRESS or a `ray start` names another
                    address=placement.address or "local",
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
                )
        except ConnectionError as e:
            if any("Unauthenticated" in line for line in core_lines):  # (Ray's exception does not say why)
                raise SantacpuError(
                    f"cannot join the Ray cluster at {placement.address}: it asks for its token (`ray start --head` "
                    "turns token authentication on from Ray 2.59): set RAY_AUTH_MODE=token here too, with the "
                    "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
            if placement.address == "auto" and "Could not find any running Ray instance" in str(e):
                raise SantacpuError("--ray-address auto: no Ray cluster runs on this machine (`ray start --head` "
                                    "starts one; --ray, one for the run)") from None
            raise SantacpuError(f"cannot join the Ray cluster at {placement.address}: {e}") from None
        except Exception as e:  # noqa: BLE001 (Ray's own start-up failures: a node that timed out, ...)
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SantacpuError(f"Ray could not start: {first_line}") from None
        except SystemExit as stop:  # SIGTERM meanwhile: Ray's handler, in place of ours during init, exits with 15
            ray.shutdown()
            if stop.code == signal.SIGTERM and callable(on_term):
                on_term(signal.SIGTERM, None)  # (the command line's: santacpu's own "terminated")
            raise
        except BaseException:  # Ctrl-C while the cluster starts: what it has started goes too
            ray.shutdown()
            raise
        finally:
            if on_term is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_term)  # (ray.init puts its own in place of the CLI's)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        threads = placement.threads or max(1, cpus // placement.workers)
        if placement.workers * threads > cpus:
            raise SantacpuError(
                f"{placement.workers} actor{'s' * (placement.workers != 1)} x {threads} thread{'s' * (threads != 1)} "
                f"need {placement.workers * threads} CPUs; the Ray "
                f"cluster has {cpus}: lower --workers or --threads-per-worker"
            )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # santacpu's own progress line counts problems
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # (its errors come out as ours, in one line)
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
        try:
            _drive(ray, dataset, score, settings, on_record, _ClusterWatch(_watched_address(ray, placement.address)))
        except ray.exceptions.RayError as e:
            raise SantacpuError(f"the Ray run failed: {_reason(e)}") from None
    finally:
        if started:
            ray.shutdown()
