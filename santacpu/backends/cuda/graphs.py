"""CUDA graphs for decode steps: a step's launches recorded, captured once, replayed.

A decode step is ~150 small launches whose arguments are the same objects every step (the
weights, the engine's reused activation buffers, the caches, the device row that holds the token
id and position: `CudaBackend.input_embeddings` writes it, the kernels read it). Launched one by
one they cost numba's host path each (5-7 ms a step on an H200); replayed as one CUDA graph they
cost one `cuGraphLaunch` (172 launches: 4.71 ms -> 0.157 ms, measured).

`StepGraphs` owns the bookkeeping. While a step is open (`open`, at the step's embedding), the
backend hands it its launches (`defer`) instead of launching them; at the step's first host read
(`flush`) the recorded launches are the step's key (the configured kernels, the arrays by
identity, the scalars by value). A key seen for the first time runs as plain launches; seen again,
it is captured from the stream into a graph (kept, least recently used first out, with the
arguments it holds) and replayed; afterwards only replayed. What varies between steps must
therefore be in device memory (token, position) or in the key: attention's grid follows the
context length's bucket (`CudaBackend.attend`), so a step crossing a bucket is another key.
Kernels run the same in both modes (the same launches, the same grids): replays give the plain
launches' bits.

`GraphDriver` is the capture and replay through the CUDA driver API of `cuda.bindings`
(numba-cuda's own binding); where it cannot be imported, under the simulator, or after a capture
fails, `StepGraphs.reason` says why and every step takes the plain launches.

May import: numpy (and `cuda.bindings` at run time).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np

MAX_GRAPHS = 24  # captured steps kept (each holds its arrays: a KV cache stays alive while one of its graphs does)
MAX_SEEN = 64  # keys seen once, waiting for a second sighting
_SCALARS = (bool, int, float, np.generic)


class GraphError(RuntimeError):
    """The driver refused a graph call (the result code's name in the message)."""


class GraphDriver:
    """Stream capture, instantiation, launch and destruction of graphs on one numba stream, by
    the driver API of `cuda.bindings` (calls return (CUresult, values...))."""

    def __init__(self, stream):
        from cuda.bindings import driver  # ImportError: no graphs

        self._driver = driver
        handle = stream.handle
        if not isinstance(handle, driver.CUstream):  # numba's ctypes binding: a c_void_p
            handle = driver.CUstream(int(getattr(handle, "value", handle) or 0))
        self._stream = handle
        self._mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED  # numba's own calls stay legal

    def _check(self, result, what: str):
        error = result[0]
        if error != self._driver.CUresult.CUDA_SUCCESS:
            raise GraphError(f"{what}: {getattr(error, 'name', error)}")
        return result[1] if len(result) > 1 else None

    def begin(self) -> None:
        self._check(self._driver.cuStreamBeginCapture(self._stream, self._mode), "cuStreamBeginCapture")

    def end(self):
        """The captured graph (after an error inside the capture, GraphError: capture is over)."""
        return self._check(self._driver.cuStreamEndCapture(self._stream), "cuStreamEndCapture")

    def instantiate(self, graph):
        """An executable graph of `graph`, which is destroyed (the executable is independent)."""
        try:
            return self._check(self._driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            self._driver.cuGraphDestroy(graph)

    def launch(self, executable) -> None:
        self._check(self._driver.cuGraphLaunch(executable, self._stream), "cuGraphLaunch")

    def destroy(self, executable) -> None:
        self._driver.cuGraphExecDestroy(executable)


def graph_driver(stream, simulated: bool) -> tuple[GraphDriver | None, str | None]:
    """(a GraphDriver on `stream`, None) or (None, why there are no graphs)."""
    if simulated:
        return None, "the CUDA simulator has no graphs"
    try:
        return GraphDriver(stream), None
    except Exception as error:  # ImportError (no cuda.bindings), or another binding's shape
        return None, f"cuda.bindings' driver API is not usable ({type(error).__name__}: {error})"


class _Entry:
    __slots__ = ("executable", "launches")

    def __init__(self, executable, launches):
        self.executable, self.launches = executable, launches  # launches: keeps their arrays alive


class StepGraphs:
    """Records a step's launches, then launches them plainly, or captures or replays them."""

    def __init__(self, launch, driver: GraphDriver | None, reason: str | None = None, *,
                 no_cleanup=contextlib.nullcontext, max_graphs: int = MAX_GRAPHS):
        self._launch = launch  # launch(configured, args): the plain (or prepared) launch
        self.driver = driver
        self.reason = reason if driver is None else None  # why steps are not graphs
        self.enabled = True  # the owner's switch (gpu_check compares both)
        self.recording = False
        self._no_cleanup = no_cleanup  # a context in which no device memory is freed (capture)
        self._max_graphs = max_graphs
        self._pending: list[tuple] = []  # (configured, *args) per launch
        self._graphs: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()
        self.replays = self.captures = self.plain_steps = 0

    @property
    def active(self) -> bool:
        """Whether the next step may become a graph."""
        return self.enabled and self.driver is not None and self.reason is None

    @property
    def mode(self) -> str:
        return "graphs" if self.active else "launches"

    def describe(self) -> str:
        if self.active:
            return f"decode steps as CUDA graphs ({self.captures} captured, {self.replays} replays)"
        why = "turned off" if self.driver is not None and self.reason is None else self.reason
        return f"decode steps as launches (no CUDA graphs: {why})"

    def open(self) -> None:
        """A step starts: what is still pending runs first, then launches are recorded."""
        self.flush()
        self.recording = self.active

    def defer(self, configured, args: tuple) -> None:
        self._pending.append((configured,) + args)

    def flush(self) -> None:
        """The recorded step runs: replayed, captured then replayed, or launched plainly."""
        self.recording = False
        if not self._pending:
            return
        launches, self._pending = self._pending, []
        key = _key(launches)
        entry = self._graphs.get(key) if self.active else None
        if entry is not None:
            self._graphs.move_to_end(key)
            self.driver.launch(entry.executable)
            self.replays += 1
            return
        if self.active and key in self._seen:
            del self._seen[key]
            executable = self._capture(launches)
            if executable is not None:
                self._keep(key, _Entry(executable, launches))
                self.driver.launch(executable)
                self.replays += 1
                return
        elif self.active:
            self._seen[key] = None
            if len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
        self._plain(launches)

    def _plain(self, launches) -> None:
        for launch in launches:
            self._launch(launch[0], launch[1:])
        self.plain_steps += 1

    def _capture(self, launches):
        """The launches captured into an executable graph (nothing runs), or None, with
        `reason` set, when the driver refuses: graphs are off from then on."""
        try:
            with self._no_cleanup():
                self.driver.begin()
                try:
                    for launch in launches:
                        self._launch(launch[0], launch[1:])
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.driver.end()  # the capture is over; what it held is dropped
                    raise
                executable = self.driver.instantiate(self.driver.end())
            self.captures += 1
            return executable
        except Exception as error:
            self.reason = f"capturing a step failed ({type(error).__name__}: {error})"
            return None

    def _keep(self, key, entry: _Entry) -> None:
        self._graphs[key] = entry
        while len(self._graphs) > self._max_graphs:
            _, old = self._graphs.popitem(last=False)
            self.driver.destroy(old.executable)

    def clear(self) -> None:
        """Forget every graph (and the arrays they hold)."""
        self.flush()
        for entry in self._graphs.values():
            with contextlib.suppress(Exception):
                self.driver.destroy(entry.executable)
        self._graphs.clear()
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._graphs)


def _key(launches: list[tuple]):
    """The step's identity: its launches by value, arrays by identity (numba's device arrays
    hash by identity). Arrays that compare by value (the simulator's) are taken by id; the
    entry holds them, so their ids stay theirs."""
    key = tuple(launches)
    try:
        hash(key)
        return key
    except TypeError:
        return tuple(tuple(a if isinstance(a, _SCALARS) else id(a) for a in launch) for launch in launches)
