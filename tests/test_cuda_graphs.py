"""CUDA graphs for decode steps (santacpu/backends/cuda/graphs.py): the bookkeeping with stand-ins
for the driver, and whole decode steps under the simulator with a driver whose "graphs" are the
recorded launches replayed with the arguments they were captured with (what a CUDA graph does):
every step after the capture replays, so whatever changes from step to step (token, position)
must come from device memory, and the logits must be the plain launches' bits. A real capture
runs in tools/gpu_check.sh (the real_gpu test here, and decode with graphs on and off).
"""

from __future__ import annotations

import numpy as np
import pytest

from santacpu.backends.cuda import device as cuda_device
from santacpu.backends.cuda.graphs import GraphError, StepGraphs, graph_driver

cuda = pytest.importorskip("numba.cuda")
from santacpu.backends.cuda import backend as cuda_backend  # noqa: E402
from santacpu.backends.cuda.backend import DEVICE_SHAPES, SIMULATOR_SHAPES, CudaBackend, attention_grid  # noqa: E402

REAL_GPU = not cuda_device.simulated()


class FakeDriver:
    """GraphDriver's calls: a capture records what is launched during it (nothing runs), a
    graph is that list, a replay launches it again with the same arguments."""

    def __init__(self, launch):
        self.run = launch  # the real launch
        self.capturing: list | None = None
        self.fail_at: str | None = None  # "end" or "instantiate": the driver refuses there
        self.destroyed, self.replayed = [], 0

    def launch_or_record(self, configured, args):
        if self.capturing is not None:
            self.capturing.append((configured, args))
        else:
            self.run(configured, args)

    def begin(self):
        self.capturing = []

    def end(self):
        graph, self.capturing = self.capturing, None
        if self.fail_at == "end":
            raise GraphError("cuStreamEndCapture: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED")
        return graph

    def instantiate(self, graph):
        if self.fail_at == "instantiate":
            raise GraphError("cuGraphInstantiate: CUDA_ERROR_INVALID_VALUE")
        return tuple(graph)

    def launch(self, executable):
        self.replayed += 1
        for configured, args in executable:
            self.run(configured, args)

    def destroy(self, executable):
        self.destroyed.append(executable)


def _graphs(max_graphs=4):
    ran = []
    driver = FakeDriver(lambda configured, args: ran.append((configured,) + args))
    return StepGraphs(driver.launch_or_record, driver, max_graphs=max_graphs), driver, ran


def _step(graphs, *launches):
    graphs.open()
    for launch in launches:
        graphs.defer(launch[0], launch[1:])
    graphs.flush()


def test_a_step_runs_plainly_then_is_captured_then_replayed():
    graphs, driver, ran = _graphs()
    buffer = object()  # an array: taken by identity
    step = [("kernel a", buffer, 1), ("kernel b", buffer, np.float32(0.5))]
    _step(graphs, *step)
    assert ran == step and graphs.plain_steps == 1 and len(graphs) == 0  # first sighting: plain
    _step(graphs, *step)
    assert ran == step * 2 and graphs.captures == 1 and driver.replayed == 1 and len(graphs) == 1
    _step(graphs, *step)
    assert ran == step * 3 and graphs.replays == 2 and graphs.captures == 1
    other = [("kernel a", object(), 1)] + step[1:]  # another array: another step
    _step(graphs, *other)
    assert ran[-2:] == other and graphs.plain_steps == 2 and graphs.mode == "graphs"
    assert "2 replays" in graphs.describe()


def test_scalars_are_part_of_the_key():
    graphs, _, ran = _graphs()
    for value in (1, 2, 3):
        _step(graphs, ("kernel", value))
    assert graphs.captures == 0 and graphs.plain_steps == 3  # three steps, each seen once
    _step(graphs, ("kernel", 2))
    _step(graphs, ("kernel", 2))
    assert graphs.captures == 1 and graphs.replays == 2 and ran[-2:] == [("kernel", 2)] * 2


def test_least_recently_used_graph_is_destroyed():
    graphs, driver, _ = _graphs(max_graphs=2)
    for name in ("a", "a", "b", "b", "a", "c", "c"):  # a, b captured; a replayed; c captured
        _step(graphs, (name,))
    assert len(graphs) == 2 and [g[0][0] for g in driver.destroyed] == ["b"]
    graphs.clear()
    assert len(graphs) == 0 and len(driver.destroyed) == 3


@pytest.mark.parametrize("where", ["end", "instantiate"])
def test_a_failed_capture_runs_the_step_plainly_and_turns_graphs_off(where):
    graphs, driver, ran = _graphs()
    step = [("kernel", 1), ("kernel", 2)]
    _step(graphs, *step)
    driver.fail_at = where
    _step(graphs, *step)
    assert ran == step * 2  # the captured launches never ran: they ran plainly, once
    assert graphs.mode == "launches" and "capturing a step failed" in graphs.reason and where[:3] in graphs.describe().lower()
    _step(graphs, *step)
    assert ran == step * 3 and graphs.captures == 0 and driver.replayed == 0
    graphs.open()
    assert not graphs.recording  # launches go straight out from now on


def test_turned_off_and_unavailable_graphs_launch_plainly():
    graphs, _, ran = _graphs()
    graphs.enabled = False
    for _ in range(3):
        _step(graphs, ("kernel", 1))
    assert graphs.captures == 0 and len(ran) == 3 and "turned off" in graphs.describe()
    none = StepGraphs(lambda c, a: ran.append(c), None, "no bindings here")
    _step(none, ("kernel",))
    _step(none, ("kernel",))
    assert none.mode == "launches" and none.describe().endswith("(no CUDA graphs: no bindings here)") and len(ran) == 5


def test_unhashable_arguments_are_keyed_by_identity():
    class ByValue:  # compares by value, as the simulator's arrays do: unhashable
        __hash__ = None

        def __eq__(self, other):
            return True

    graphs, _, ran = _graphs()
    a = ByValue()
    for _ in range(3):
        _step(graphs, ("kernel", a, 1))
    assert graphs.captures == 1 and graphs.replays == 2
    _step(graphs, ("kernel", ByValue(), 1))  # equal by value, another array: not the same step
    assert graphs.plain_steps == 2


def test_the_simulator_has_no_graphs():
    assert graph_driver(None, simulated=True) == (None, "the CUDA simulator has no graphs")
    if not REAL_GPU:
        backend = CudaBackend()
        assert backend.launch_mode == "launches" and "simulator has no graphs" in backend.describe()


@pytest.mark.parametrize("shapes", [DEVICE_SHAPES, SIMULATOR_SHAPES], ids=["device", "simulator"])
def test_a_decode_steps_attention_grid_follows_its_bucket(shapes):
    bucket = shapes.position_bucket
    for first in (0, bucket, 5 * bucket):  # every step of a bucket: one grid (one graph)
        grids = {attention_grid(1, start, shapes) for start in range(first, first + bucket)}
        assert len(grids) == 1
        splits, per_split = grids.pop()
        assert splits * per_split * 32 >= first + bucket and (splits - 1) * per_split * 32 < first + bucket
    assert attention_grid(1, bucket - 1, shapes) != attention_grid(1, bucket, shapes)  # the next bucket
    # a prompt's grid covers its own positions only
    T = cuda_backend.STEP_TOKENS + 1
    splits, per_split = attention_grid(T, 0, shapes)
    assert (splits - 1) * per_split < -(-T // 32) <= splits * per_split


def _decode(weights, backend, steps=3, prompt=(5, 17, 3)):
    from santacpu.network.engine import Engine

    engine = Engine(weights, backend)
    cache = engine.new_cache(len(prompt) + steps)
    logits = [engine.forward(cache, list(prompt))]
    for _ in range(steps):
        logits.append(engine.forward(cache, [int(np.argmax(logits[-1][-1]))]))
    return np.concatenate(logits)


@pytest.fixture(scope="module")
def sim_q4(tmp_path_factory):
    from santacpu.formats.blocks import QuantizedWeight, get_format
    from santacpu.loading.checkpoint import read_checkpoint
    from santacpu.loading.random_checkpoint import write_checkpoint

    weights = read_checkpoint(write_checkpoint(tmp_path_factory.mktemp("sim"), size="sim", with_tokenizer=False))

    def q(w):
        return QuantizedWeight("q4_0", w.shape, get_format("q4_0").quantize(w)) if w.ndim == 2 else w

    layers = [type(layer)(**{name: q(value) for name, value in vars(layer).items()}) for layer in weights.layers]
    return type(weights)(weights.config, q(weights.wte), weights.wpe, layers, weights.ln_f_weight, weights.ln_f_bias)


@pytest.fixture(scope="module")
def plain_decode(sim_q4):
    return _decode(sim_q4, CudaBackend(graphs=False))


def _with_fake_graphs(fail_at=None):
    backend = CudaBackend()
    driver = FakeDriver(backend._launcher)
    driver.fail_at = fail_at
    backend._graphs = StepGraphs(driver.launch_or_record, driver)
    return backend, driver


def test_replayed_steps_give_the_plain_launches_logits(sim_q4, plain_decode):
    """The prompt, a plain step, a captured step (replayed as it is captured), then a replay of the
    very launches the capture recorded, at another position with another token: the same logits
    to the bit. (Few steps: each costs seconds on the simulator.)"""
    backend, driver = _with_fake_graphs()
    got = _decode(sim_q4, backend)
    assert backend.graph_counts == {"captures": 1, "replays": 2, "plain_steps": 2, "kept": 1}
    assert driver.replayed == 2 and backend.launch_mode == "graphs"
    assert np.array_equal(got, plain_decode)


def _batched_decode(weights, backend, steps=3):
    from santacpu.network.engine import Engine

    engine = Engine(weights, backend)
    caches = [engine.new_cache(12), engine.new_cache(12)]
    engine.forward(caches[0], [5, 17])
    engine.forward(caches[1], [3])
    tokens, logits = [[7], [9]], []
    for _ in range(steps):
        rows = engine.forward_batch(caches, tokens, [False, False])
        logits.append(np.concatenate(rows))
        tokens = [[int(np.argmax(r[-1]))] for r in rows]
    return np.concatenate(logits)


def test_replayed_batched_steps_give_the_plain_launches_logits(sim_q4):
    """Two sequences a step (forward_batch): the step's arrays come from the backend's pool and
    its per-sequence row slices are the same objects every step, so the step repeats: plain,
    captured, then replayed, with the plain launches' logits."""
    plain = _batched_decode(sim_q4, CudaBackend(graphs=False))
    backend, driver = _with_fake_graphs()
    got = _batched_decode(sim_q4, backend)
    assert backend.graph_counts["captures"] == 1 and backend.graph_counts["replays"] == 2 and driver.replayed == 2
    assert np.array_equal(got, plain)


def test_a_steps_arrays_are_pooled_and_their_row_slices_kept():
    backend, _ = _with_fake_graphs()
    outside = backend.empty((2, 4))
    assert backend.empty((2, 4)) is not outside  # no step open: a new array each time
    taken = []
    for _ in range(2):
        backend._graphs.open()
        backend._pool_taken = {}
        taken.append([backend.empty((2, 4)), backend.empty((2, 4)), backend.empty((3, 4)), backend.empty((1, 4))])
        backend._graphs.flush()
    first, second = taken
    assert first[0] is not first[1]  # distinct within a step
    assert all(a is b for a, b in zip(first[:3], second[:3]))  # the same ones, in order, next step
    assert first[3] is not second[3]  # one-row arrays are never pooled (the engine keeps its own)
    assert first[0][0:1] is second[0][0:1] and first[0][0:1] is not first[0][1:2]


def test_a_failed_capture_falls_back_visibly(sim_q4, plain_decode):
    backend, driver = _with_fake_graphs(fail_at="instantiate")
    got = _decode(sim_q4, backend)
    assert backend.launch_mode == "launches" and "capturing a step failed" in backend.describe()
    assert backend.graph_counts["replays"] == 0 and driver.replayed == 0
    assert np.array_equal(got, plain_decode)


@pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU (tools/gpu_check.sh runs it there)")
def test_real_graphs_give_the_plain_launches_logits(sim_q4):
    backend = CudaBackend(SIMULATOR_SHAPES)
    plain = _decode(sim_q4, CudaBackend(SIMULATOR_SHAPES, graphs=False))
    got = _decode(sim_q4, backend)
    assert backend.launch_mode == "graphs", backend.describe()
    assert backend.graph_counts["replays"] >= 2
    assert np.array_equal(got, plain)


def _fake_bindings(monkeypatch, fail: str | None = None):
    """A stand-in for `cuda.bindings.driver` as numba-cuda 0.30's binding is: every call returns
    a tuple, (CUresult,) or (CUresult, value); the stream handle is a CUstream."""
    import enum
    import sys
    import types

    class CUresult(enum.Enum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901

    class CUstream:
        def __init__(self, value=0):
            self.value = value

    calls = []

    def call(name, *result):
        def function(*args):
            calls.append((name, args))
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED if name == fail else CUresult.CUDA_SUCCESS,) + result
        return function

    driver = types.SimpleNamespace(
        CUresult=CUresult, CUstream=CUstream,
        CUstreamCaptureMode=types.SimpleNamespace(CU_STREAM_CAPTURE_MODE_RELAXED="relaxed"),
        cuStreamBeginCapture=call("cuStreamBeginCapture"), cuStreamEndCapture=call("cuStreamEndCapture", "graph"),
        cuGraphInstantiate=call("cuGraphInstantiate", "executable"), cuGraphLaunch=call("cuGraphLaunch"),
        cuGraphDestroy=call("cuGraphDestroy"), cuGraphExecDestroy=call("cuGraphExecDestroy"),
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver
    monkeypatch.setitem(sys.modules, "cuda", sys.modules.get("cuda") or types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    return driver, calls


def test_graph_driver_speaks_the_bindings_tuples(monkeypatch):
    from santacpu.backends.cuda.graphs import GraphDriver

    driver, calls = _fake_bindings(monkeypatch)
    stream = driver.CUstream(5)
    graphs = GraphDriver(type("Stream", (), {"handle": stream})())
    graphs.begin()
    executable = graphs.instantiate(graphs.end())
    graphs.launch(executable)
    graphs.destroy(executable)
    assert [name for name, _ in calls] == ["cuStreamBeginCapture", "cuStreamEndCapture", "cuGraphInstantiate",
                                           "cuGraphDestroy", "cuGraphLaunch", "cuGraphExecDestroy"]
    assert calls[0][1] == (stream, "relaxed") and calls[2][1] == ("graph", 0) and calls[4][1] == ("executable", stream)
    # numba's ctypes binding hands a c_void_p: made a CUstream of the same value
    other = GraphDriver(type("Stream", (), {"handle": type("Pointer", (), {"value": 7})()})())
    other.begin()
    assert calls[-1][1][0].value == 7


def test_graph_driver_errors_name_the_result(monkeypatch):
    from santacpu.backends.cuda.graphs import GraphDriver

    driver, calls = _fake_bindings(monkeypatch, fail="cuGraphInstantiate")
    graphs = GraphDriver(type("Stream", (), {"handle": driver.CUstream(1)})())
    with pytest.raises(GraphError, match="cuGraphInstantiate: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"):
        graphs.instantiate("graph")
    assert calls[-1][0] == "cuGraphDestroy"  # the graph is freed whatever instantiation says


def test_without_cuda_bindings_the_reason_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails
    driver, reason = graph_driver(type("Stream", (), {"handle": None})(), simulated=False)
    assert driver is None and reason.startswith("cuda.bindings' driver API is not usable (")
