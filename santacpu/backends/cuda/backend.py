"""`CudaBackend`: the Backend protocol (`santacpu.backends.base`) on an NVIDIA GPU via numba.cuda.

`prepare` uploads every weight once, as stored (packed blocks, fp16 bits, fp32), and the engine's
weights are then these device copies; activations and the KV cache live on the device, and only
token ids and positions go in and the wanted logits (and the final hidden state, for the
finiteness check) come out. Kernels come from linear_kernels.py and layer_kernels.py; each
launch's configured kernel object is cached, and launches with the same arrays are prepared once
(launch.py), so a decode step launched one by one pays the driver's launch for each of its 6
launches a layer.

Decode steps (calls of at most STEP_TOKENS tokens) run as CUDA graphs where the driver allows
(graphs.py): their launches are recorded from `input_embeddings` on and run, captured or
replayed at the step's first host read (`to_host`, `take_rows`, `copy_kv_prefix`), so device
arrays are read through `to_host`. Everything a step varies lives in device memory (the token
ids and positions `input_embeddings` writes, which attention and the embeddings read) or changes
the step's key (attention's grid by the context length's bucket; the caches); a step's own
activations come from a pool, the same arrays every step of its size. `launch_mode` and
`describe()` say whether steps are graphs, and why not.

Under the simulator (`NUMBA_ENABLE_CUDASIM=1`: every thread a Python thread) the same kernels run
with small blocks (`SIMULATOR_SHAPES`) and warps of `values.LANES` = 4 lanes (a GPU's are 32):
the kernels are written for any block size and lane count, and the tests cover both block sizes
on small shapes (the 32 lanes on a GPU, under tools/gpu_check.sh).

Shape legend: T = tokens in this call, E = n_embd, H = n_head, G = n_kv_head, D = head_dim.

May import: numba, numpy, this package's modules, `santacpu.formats`, `santacpu.errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import weakref
from dataclasses import dataclass

import numpy as np
from numba import config as numba_config
from numba import cuda

from ...errors import SantacpuError
from ...formats.blocks import FORMATS, PART_ORDER, QuantizedWeight
from ...formats.split_rows import SplitRowsWeight, widened_to_q8_0
from . import layer_kernels as lk
from . import linear_kernels as mk
from . import tensor_cores as tc
from .device import simulated
from .graphs import StepGraphs, graph_driver
from .launch import Launcher
from .values import FORMAT_IDS, LANES

N_PARTS = 5  # every weight travels as p0..p4 (see values.py)
CHUNK_FORMATS = {FORMAT_IDS[name] for name in ("q8_0", "q4_0", "q6_0")}  # matvec_chunks' (64-bit chunks of codes)
FORMAT_NAMES = {number: name for name, number in FORMAT_IDS.items()}
TENSOR_CORE_FORMATS = frozenset(FORMAT_IDS[name] for name in ("q8_0", "q4_0", "q6_0", "q4_m"))
# The tensor-core kernel against the fp32 tiles on the self-check's product: both near fp32
# rounding (x as two fp16 halves loses ~2**-22 of itself; measured under the simulator: 1e-7).
SELF_CHECK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LaunchShapes:
    matvec: tuple[int, int]  # (lanes a row, rows a block), powers of two
    matvec_chunks: tuple[int, int]  # a few tokens of q8_0 / q4_0 / q6_0: as matvec_one
    matvec_one: tuple[int, int]  # one token: (warps a block, blocks a multiprocessor at most; 0: a warp a row)
    matmul_side: int  # s x s threads, a tile of 4s rows x 4s tokens
    norm_threads: int  # a power of two
    attention_blocks: int  # spread a prompt's attention over at least this many blocks
    attention_step: tuple[int, int]  # a decode step's attention: (heads a block, chunks of CHUNK positions a split)
    flat_threads: int  # element-wise kernels
    position_bucket: int  # a decode step's attention grid covers its context length rounded up to this


# The launch shapes a GPU gets that tools/gpu_check.py times against others (docs/gpu.md has the
# numbers): flip them here after a run.
MATVEC_CHUNKS = (8, 0)  # 8 rows a block (each stages every token's x), no cap; 256 threads: room for 16 accumulators
MATVEC_ONE = (8, 4)  # 8 rows a block, at most 4 blocks a multiprocessor (then rows by a stride)
ATTENTION_STEP = (16, 1)  # all 16 heads a block (K/V staged once for all), 32 positions a split
# attention_blocks: two blocks for each of an H100's or H200's 132 multiprocessors.
DEVICE_SHAPES = LaunchShapes(
    matvec=(32, 8), matvec_chunks=MATVEC_CHUNKS, matvec_one=MATVEC_ONE, matmul_side=16, norm_threads=256, attention_blocks=264,
    attention_step=ATTENTION_STEP, flat_threads=256, position_bucket=256,
)
# The simulator pays for every block and every barrier of its threads (each a Python thread): few
# blocks, few threads, one lane a row.
SIMULATOR_SHAPES = LaunchShapes(
    matvec=(1, 16), matvec_chunks=(2, 2), matvec_one=(2, 2), matmul_side=4, norm_threads=2, attention_blocks=3,
    attention_step=(2, 1), flat_threads=64, position_bucket=lk.CHUNK,
)
# Calls of at most this many tokens are decode steps (one token, a token and its drafts, a batch
# of sequences' next tokens): attention stores their K/V itself and takes its grid from the
# context length's bucket, and their launches are recorded for CUDA graphs (graphs.py).
STEP_TOKENS = 32


def attention_grid(T: int, start: int, shapes: LaunchShapes, tiles: int | None = None) -> tuple[int, int]:
    """(splits, chunks a split) of attention over positions 0..start+T-1. A decode step's
    (T <= STEP_TOKENS: `attention_step`) covers its length rounded up to the position bucket, so
    every step of a bucket has the same grid (one CUDA graph; the kernel reads the real length
    from device memory), in splits of `shapes.attention_step[1]` chunks (more where that would
    make over MAX_SPLITS); a prompt's (`attention`, `tiles` blocks a split: `prompt_tiles`)
    enough splits to fill the GPU."""
    n_positions = start + T  # the last token's
    if T <= STEP_TOKENS:
        n_positions = -(-n_positions // shapes.position_bucket) * shapes.position_bucket
        chunks = -(-n_positions // lk.CHUNK)
        per_split = max(shapes.attention_step[1], -(-chunks // lk.MAX_SPLITS))
        return -(-chunks // per_split), per_split
    chunks = -(-n_positions // lk.CHUNK)
    splits = min(chunks, max(1, -(-shapes.attention_blocks // (tiles or T))))
    per_split = -(-chunks // splits)
    return -(-chunks // per_split), per_split


def prompt_tiles(T: int, n_head: int, n_kv: int) -> int:
    """Blocks of a prompt's `attention` a split: tiles of lk.TILE_ROWS query rows ((token, head)
    pairs) of each K/V head."""
    return -(-T * (n_head // n_kv) // lk.TILE_ROWS) * n_kv


def step_heads(n_head: int, n_kv: int, shapes: LaunchShapes) -> int:
    """Heads a block of `attention_step`: the largest divisor of a K/V head's group of query
    heads not over `shapes.attention_step[0]` (a block's heads share one K/V head)."""
    group = n_head // n_kv
    return max(d for d in range(1, min(group, shapes.attention_step[0]) + 1) if group % d == 0)


_ROW_VIEW_CLASSES: dict[type, type] = {}


def _with_lasting_row_views(array):
    """`array`, its class made a subclass whose row slices (x[a:b]) are made once and kept: the
    engine slices each sequence's rows out of a batched step's arrays, and a recorded step is
    keyed by its arrays' identities. (A class that refuses the change keeps its own slices.)"""
    base = type(array)
    subclass = _ROW_VIEW_CLASSES.get(base)
    if subclass is None:

        def __getitem__(self, item, _base=base):
            if type(item) is not slice:
                return _base.__getitem__(self, item)
            views = self.__dict__.setdefault("_row_views", {})
            key = (item.start, item.stop, item.step)
            view = views.get(key)
            if view is None:
                view = views[key] = _base.__getitem__(self, item)
            return view

        subclass = _ROW_VIEW_CLASSES[base] = type(f"LastingRowViews{base.__name__}", (base,), {"__getitem__": __getitem__})
    try:
        array.__class__ = subclass
    except TypeError:
        pass
    return array


# The simulator's block manager polls its threads in a loop that holds the GIL: a thread it wakes
# at a barrier waits out the interpreter's switch interval (5 ms by default) for the GIL, so every
# barrier of every block cost ~5 ms of CPU, whatever the block's size. While a simulated kernel
# runs (`_SimulatorLaunch`) the interval is this instead: a whole-model simulator test ~4x faster.
# (Threads then interleave anywhere, not only at barriers: see values.py on the simulator's `cuda`.)
SIMULATOR_SWITCH_INTERVAL = 1e-4


class _SimulatorLaunch:
    """kernel[grid, block] under the simulator, configured when called: the simulator's
    kernel[grid, block] reconfigures one shared object, which a recorded launch cannot hold."""

    __slots__ = ("kernel", "grid", "block", "shared")

    def __init__(self, kernel, grid, block, shared=0):
        self.kernel, self.grid, self.block, self.shared = kernel, grid, block, shared

    def __call__(self, *args):
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SIMULATOR_SWITCH_INTERVAL))
        try:
            self.kernel[self.grid, self.block, 0, self.shared](*args)
        finally:
            sys.setswitchinterval(interval)


@dataclass(frozen=True)
class DeviceWeight:
    """A [rows, cols] weight on the device as stored: format id and its parts p0..p4."""

    fmt: int
    shape: tuple[int, int]
    parts: tuple
    nbytes: int
    chunks: tuple  # int64 views of parts 0 and 1 where they are bytes (matvec_one reads 64-bit chunks)

    @property
    def fmt_name(self) -> str:
        return FORMAT_NAMES[self.fmt]


class CudaBackend:
    name = "cuda"

    def __init__(self, shapes: LaunchShapes | None = None, graphs: bool = True, tensor_cores: bool | None = None):
        # Small grids (a decode step's attention, LayerNorm) are by design: no warning for each.
        numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = False
        try:
            from numba.cuda.core import config as cuda_config  # numba-cuda's own settings

            cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = False
        except ImportError:
            pass
        self.simulated = simulated()
        self.shapes = shapes or (SIMULATOR_SHAPES if self.simulated else DEVICE_SHAPES)
        self.weight_bytes = 0  # device memory the uploaded weights take
        self._multiprocessors = 1 if self.simulated else cuda.get_current_device().MULTIPROCESSOR_COUNT
        self._placeholder = cuda.to_device(np.zeros((1, 1), np.uint8))
        self._placeholder_chunks = cuda.to_device(np.zeros((1, 1), np.int64))
        self._unused_vector = cuda.to_device(np.zeros(1, np.float32))
        self._zeros: dict[int, object] = {}
        self._launches: dict[tuple, object] = {}
        self._timings: list | None = None  # (label, bytes read, start event, end event) while profiling
        self._launcher = Launcher(enabled=not self.simulated)
        # Every launch goes to one stream of our own (graphs are captured from a stream; the
        # legacy default stream cannot be), which synchronizes with the default stream.
        self._stream = None if self.simulated else cuda.stream()
        driver, reason = graph_driver(self._stream, self.simulated)
        self._graphs = StepGraphs(self._launcher, driver, reason, no_cleanup=cuda.defer_cleanup)
        self._graphs.enabled = graphs
        self._rows: dict[int, tuple] = {}  # T -> ([2, T] int64 device ids and positions, its two rows)
        self._positions: tuple = (None, None)  # the last embedded positions: (host, device)
        self._position_index: dict | None = None
        self._parts: dict[tuple, tuple] = {}  # see _attention_parts
        self._words: dict[int, tuple] = {}  # id(fp16 cache) -> (a weak reference to it, its uint32 view)
        self._pool: dict[tuple, list] = {}  # shape -> a step's arrays of that shape, in the order asked for
        self._pool_taken: dict[tuple, int] = {}  # how many of each this step has taken
        # attention's partial-sum arguments when a call needs none (typed like the real ones)
        self._unused_parts = (cuda.device_array((1, 1, 1), np.float32),) * 3 + (cuda.device_array(1, np.int32),)
        self._scratch_buffers: dict[str, tuple] = {}  # name -> (flat buffer, {shape: its view}): see _scratch
        # Prompts' block-format products on tensor cores (tensor_cores.py): None decides at the
        # first `prepare` (a GPU of compute capability 8.0 or more whose self-check passes; never
        # the simulator, where tests turn them on); `tensor_core_reason` says why not.
        self.tensor_cores = tensor_cores
        self.tensor_core_reason: str | None = "turned off" if tensor_cores is False else None

    def describe(self) -> str:
        """Where the forward pass runs, in words: the GPU and the device memory its weights take."""
        if self.simulated:
            name = "the CUDA simulator"
        else:
            name = cuda.get_current_device().name
            name = name.decode() if isinstance(name, bytes) else str(name)
        prompts = "tensor cores" if self.tensor_cores else f"fp32 tiles ({self.tensor_core_reason or 'not decided yet'})"
        return f"cuda: {name}, {self.weight_bytes / 1e6:.0f} MB of device memory for the weights; {self._graphs.describe()}; prompts on {prompts}"

    @property
    def launch_mode(self) -> str:
        """How decode steps run: "graphs" (captured CUDA graphs, replayed) or "launches" (one
        by one; `graph_reason` says why)."""
        return self._graphs.mode

    @property
    def graph_reason(self) -> str | None:
        """Why decode steps are not graphs (None where they are, or are only turned off)."""
        return self._graphs.reason

    @property
    def use_graphs(self) -> bool:
        return self._graphs.enabled

    @use_graphs.setter
    def use_graphs(self, on: bool) -> None:
        """Turn CUDA graphs on or off (the same kernels either way: tools/gpu_check.py compares)."""
        self._graphs.flush()
        self._graphs.enabled = bool(on)

    @property
    def graph_counts(self) -> dict:
        """Decode steps so far: captured into graphs, replayed, launched one by one; graphs kept."""
        g = self._graphs
        return {"captures": g.captures, "replays": g.replays, "plain_steps": g.plain_steps, "kept": len(g)}

    def _launch(self, kernel, grid, block, label: str | None = None, nbytes: int = 0, shared: int = 0):
        """A function that launches `kernel` on grid x block (with `shared` bytes of dynamic
        shared memory) with the arguments it is given."""
        key = (kernel, grid, block, shared)
        configured = self._launches.get(key)
        if configured is None:
            if self.simulated:
                configured = _SimulatorLaunch(kernel, grid, block, shared)
            else:
                configured = kernel[grid, block, self._stream, shared]
            self._launches[key] = configured
        if self._timings is None:
            return lambda *args: self._run(configured, args)
        return lambda *args: self._timed(configured, label or kernel.py_func.__name__, nbytes, args)

    def _run(self, configured, args) -> None:
        if self._graphs.recording:  # inside a decode step: launched (or replayed) at its end
            self._graphs.defer(configured, args)
        else:
            self._launcher(configured, args)

    def _timed(self, configured, label: str, nbytes: int, args) -> None:
        start, end = cuda.event(), cuda.event()
        start.record(self._stream or 0)
        self._launcher(configured, args)
        end.record(self._stream or 0)
        self._timings.append((label, nbytes, start, end))

    def profile(self, work) -> list[tuple[str, int, float]]:
        """Run work() with every launch timed by device events: [(label, bytes of weights read,
        milliseconds)] in launch order. Events between launches add a little host time."""
        self._graphs.flush()
        self._timings = []  # no step is recorded while profiling: every launch is timed
        try:
            work()
            cuda.synchronize()
            return [(label, nbytes, a.elapsed_time(b)) for label, nbytes, a, b in self._timings]
        finally:
            self._timings = None

    @property
    def fast_launches(self) -> int:
        """Launches so far that took the prepared path (see launch.py)."""
        return self._launcher.fast_launches

    def memory_used(self) -> int | None:
        """Bytes of device memory in use on this GPU (by every process), from the driver (None
        under the simulator)."""
        if self.simulated:
            return None
        free, total = cuda.current_context().get_memory_info()
        return total - free

    def copy_bandwidth(self, nbytes: int = 1 << 30, repeat: int = 10) -> float | None:
        """The device's memory bandwidth in GB/s (bytes read plus written), by the copy kernel
        (the best of `repeat`); None under the simulator, whose timings mean nothing."""
        if self.simulated:
            return None
        source = cuda.device_array(nbytes // 8, np.int64)
        target = cuda.device_array(nbytes // 8, np.int64)
        self._graphs.flush()
        launch = self._launch(lk.copy, 32 * cuda.get_current_device().MULTIPROCESSOR_COUNT, 256)
        launch(source, target)
        best = math.inf
        for _ in range(repeat):
            start, end = cuda.event(), cuda.event()
            start.record(self._stream)
            launch(source, target)
            end.record(self._stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return 2 * source.nbytes / best / 1e9

    # --- weights -------------------------------------------------------------------------------

    def prepare(self, weights):
        """Device copies of every weight (ModelWeights of DeviceWeight matrices and device vectors)."""
        self._check_fits(weights.config)
        if self.tensor_cores is None:
            self.tensor_cores, self.tensor_core_reason = self._tensor_cores_usable()
        def vector(v):
            array = cuda.to_device(np.ascontiguousarray(v, np.float32))
            self.weight_bytes += array.nbytes
            return array

        layers = [
            dataclasses.replace(
                layer,
                **{
                    f.name: (self._matrix if len(getattr(layer, f.name).shape) == 2 else vector)(getattr(layer, f.name))
                    for f in dataclasses.fields(layer)
                },
            )
            for layer in weights.layers
        ]
        return dataclasses.replace(
            weights,
            wte=self._matrix(weights.wte),
            wpe=self._matrix(weights.wpe),
            layers=layers,
            ln_f_weight=vector(weights.ln_f_weight),
            ln_f_bias=vector(weights.ln_f_bias),
        )

    def _tensor_cores_usable(self) -> tuple[bool, str | None]:
        """(whether prompts' block-format products may run on tensor cores, why not): a GPU of
        compute capability 8.0 or more, and the kernel's result on a small q4_m product (the
        format with the most parts) equal to the fp32 tiles' within fp32 rounding. A GPU whose
        driver or PTX JIT refuses the kernel says so here instead of failing a prompt."""
        if self.simulated:
            return False, "the simulator runs the fp32 tiles unless asked (tests ask)"
        if tc.UNAVAILABLE:
            return False, tc.UNAVAILABLE
        capability = tuple(cuda.get_current_device().compute_capability)
        if not tc.supported(capability):
            return False, f"compute capability {capability[0]}.{capability[1]}; mma.sync's m16n8k16 needs 8.0"
        return self.tensor_core_self_check()

    def tensor_core_self_check(self) -> tuple[bool, str | None]:
        """(passed, why not) of the tensor-core kernel against the fp32 tiles on a small product."""
        rng = np.random.default_rng(0)
        rows, cols, tokens = 72, 96, 70  # a tile and a partial one each way
        weight = QuantizedWeight("q4_m", (rows, cols), FORMATS["q4_m"].quantize(rng.standard_normal((rows, cols)).astype(np.float32)))
        x = cuda.to_device(rng.standard_normal((tokens, cols)).astype(np.float32))
        bias = cuda.to_device(rng.standard_normal(rows).astype(np.float32))
        uploaded = self.weight_bytes
        try:
            matrix = self._matrix(weight)
            results = [self.linear(x, matrix, bias, tensor_cores=on).copy_to_host() for on in (False, True)]
        except Exception as e:  # noqa: BLE001 (any refusal, from the JIT or the driver, turns them off)
            return False, f"the tensor-core kernel failed its self-check: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            self.weight_bytes = uploaded  # the check's weight is not the model's
        error = float(np.abs(results[1] - results[0]).max() / max(np.abs(results[0]).max(), 1e-30))
        if not error <= SELF_CHECK_TOLERANCE:
            return False, f"the tensor-core kernel failed its self-check (relative error {error:.2e})"
        return True, None

    def _check_fits(self, config) -> None:
        """The model's shape against the kernels' compile-time limits, before any upload."""
        matvec_lanes, matvec_rows = self.shapes.matvec
        problems = []
        if config.n_head > lk.MAX_HEADS:
            problems.append(f"{config.n_head} heads (at most {lk.MAX_HEADS})")
        if config.head_dim > lk.MAX_HEAD_DIM or config.head_dim % 2:
            problems.append(f"head_dim {config.head_dim} (at most {lk.MAX_HEAD_DIM}, even)")
        if matvec_lanes * matvec_rows > mk.MAX_MATVEC_THREADS or self.shapes.matmul_side > mk.MAX_TILE_SIDE:
            problems.append(f"launch shapes {self.shapes}")
        if problems:
            raise SantacpuError(f"the CUDA kernels cannot run this model: {', '.join(problems)}")

    def _matrix(self, weight) -> DeviceWeight:
        if isinstance(weight, SplitRowsWeight):  # one kernel per matrix here: the same values as q8_0
            weight = widened_to_q8_0(weight)
        if isinstance(weight, QuantizedWeight):
            fmt = FORMAT_IDS[weight.qtype]
            parts = [weight.parts[name] for name in PART_ORDER[weight.qtype]]
        else:
            fmt = FORMAT_IDS["float16" if weight.dtype == np.float16 else "float32"]
            parts = [weight if weight.dtype == np.float16 else np.asarray(weight, np.float32)]
        # fp16 parts travel as their bits (values.half_to_float widens them)
        stored = [cuda.to_device(np.ascontiguousarray(p.view(np.uint16) if p.dtype == np.float16 else p)) for p in parts]
        nbytes = sum(p.nbytes for p in stored)
        self.weight_bytes += nbytes
        padded = tuple(stored) + (self._placeholder,) * (N_PARTS - len(stored))
        chunks = tuple(
            p.view(np.int64) if p.dtype.itemsize == 1 and p.shape[1] % 8 == 0 else self._placeholder_chunks for p in padded[:2]
        )
        return DeviceWeight(fmt, tuple(weight.shape), padded, nbytes, chunks)

    def _zero_bias(self, n: int):
        if n not in self._zeros:
            self._zeros[n] = cuda.to_device(np.zeros(n, np.float32))
        return self._zeros[n]

    # --- arrays --------------------------------------------------------------------------------

    def empty(self, shape: tuple[int, ...]):
        if self._graphs.recording and shape[0] > 1:  # a step's own activations (see base.Backend.empty)
            return self._pooled(tuple(shape))
        return cuda.device_array(shape, np.float32)

    def _pooled(self, shape: tuple[int, ...]):
        """The step's next array of this shape: the same arrays, in the same order, every step
        (so a batched step's launches repeat, and its graph with them)."""
        taken = self._pool_taken.get(shape, 0)
        self._pool_taken[shape] = taken + 1
        arrays = self._pool.setdefault(shape, [])
        if taken == len(arrays):
            arrays.append(_with_lasting_row_views(cuda.device_array(shape, np.float32)))
        return arrays[taken]

    def new_kv(self, shape: tuple[int, ...], dtype):
        # fp16 is kept as its bits: the kernels widen and round it themselves (values.py)
        return cuda.device_array(shape, np.uint16 if np.dtype(dtype) == np.float16 else np.float32)

    def copy_kv_prefix(self, target, source, n: int) -> None:
        self._graphs.flush()
        L, _, G, D = source.shape
        if L * n * G * D:  # each position's G x D values as one row: [L, n_ctx, G*D] views
            target_rows = target.reshape(L, target.shape[1], G * D)
            source_rows = source.reshape(L, source.shape[1], G * D)
            self._flat(lk.copy_kv_prefix, L * n * G * D)(source_rows, target_rows, n)

    def take_rows(self, x, rows: list[int]):
        self._graphs.flush()
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return x[rows[0] : rows[0] + len(rows)]
        return cuda.to_device(np.ascontiguousarray(x.copy_to_host()[rows]))

    def to_host(self, x) -> np.ndarray:
        self._graphs.flush()  # a recorded step runs before anything is read
        if self._stream is None:
            return x.copy_to_host()
        host = x.copy_to_host(stream=self._stream)
        self._stream.synchronize()
        return host

    def _flat(self, kernel, n: int, label: str | None = None):
        threads = self.shapes.flat_threads
        return self._launch(kernel, (n + threads - 1) // threads, threads, label)

    def _scratch(self, name: str, shape: tuple[int, int], dtype):
        """A [rows, cols] view of the scratch buffer `name`, grown to the largest asked for: the
        tensor-core products' staged operands, written and read by one product at a time (every
        launch goes to one stream, in order). The same view object for the same shape while the
        buffer stays (a decode step's arrays must recur for its CUDA graph to replay; a graph
        holds its views, and so the buffer they were cut from, after it grows)."""
        size = shape[0] * shape[1]
        buffer, views = self._scratch_buffers.get(name, (None, {}))
        if buffer is None or buffer.size < size:
            buffer, views = cuda.device_array(size, dtype), {}
            self._scratch_buffers[name] = (buffer, views)
        view = views.get(shape)
        if view is None:
            if len(views) > 64:  # prompts' lengths seldom recur
                views.clear()
            view = views[shape] = buffer[:size].reshape(shape)
        return view

    # --- the forward pass's operations ---------------------------------------------------------

    def input_embeddings(self, wte: DeviceWeight, wpe: DeviceWeight, ids: np.ndarray, positions: np.ndarray, out=None):
        T, E = len(ids), wte.shape[1]
        both = np.array([ids, positions], np.int64)  # one copy to the device for both
        self._graphs.flush()  # the last step's launches read the rows rewritten below
        if T <= STEP_TOKENS:  # decode steps: the same device rows every step (prepared launches, graphs)
            if T not in self._rows:
                rows = cuda.to_device(both)
                self._rows[T] = (rows, rows[0], rows[1])
            rows, token_rows, position_rows = self._rows[T]
            if self._stream is None:
                rows.copy_to_device(both)
            else:
                rows.copy_to_device(both, stream=self._stream)
            self._graphs.open()  # this step's launches are recorded until its first host read
            self._pool_taken = {}
        else:
            rows = cuda.to_device(both)
            token_rows, position_rows = rows[0], rows[1]
        self._positions = (both[1], position_rows)
        self._position_index = None  # position -> its first row, made when a batched step asks
        out = self.empty((T, E)) if out is None else out
        self._flat(lk.embed, T * E)(wte.fmt, *wte.parts, token_rows, False, out)
        self._flat(lk.embed, T * E)(wpe.fmt, *wpe.parts, position_rows, True, out)
        return out

    def linear(self, x, weight: DeviceWeight, bias, out=None, *, gelu: bool = False, add_to=None, norm=None, tensor_cores=None):
        """out = x @ W.T + bias, with an epilogue (gelu, add_to) and a LayerNorm before (norm);
        tensor_cores: whether a prompt's block-format product may take them (default: the
        backend's choice)."""
        T = x.shape[0]
        n_out = weight.shape[0]
        if bias is None:
            bias = self._zero_bias(n_out)
        if add_to is not None:
            out, epilogue = add_to, mk.EPILOGUE_ADD
        else:
            out = self.empty((T, n_out)) if out is None else out
            epilogue = mk.EPILOGUE_GELU if gelu else mk.EPILOGUE_NONE
        label = f"{weight.fmt_name} {weight.shape[0]}x{weight.shape[1]}" if self._timings is not None else None
        if T == 1 and weight.shape[1] <= mk.MAX_ONE_TOKEN_INPUTS:
            warps, per_multiprocessor = self.shapes.matvec_one
            grid = -(-n_out // warps)
            if per_multiprocessor:
                grid = min(grid, per_multiprocessor * self._multiprocessors)
            shared = mk.matvec_one_shared(weight.shape[1], warps)
            launch = self._launch(mk.matvec_one, grid, (LANES, warps), label and "matvec_one " + label, weight.nbytes, shared)
            ln_weight, ln_bias, eps = norm if norm is not None else (self._unused_vector, self._unused_vector, 0.0)
            normalize = norm is not None
            launch(weight.fmt, *weight.parts, *weight.chunks, x, bias, out, epilogue, normalize, ln_weight, ln_bias, np.float32(eps))
            return out
        if norm is not None:
            x = self.layer_norm(x, *norm)
        if T <= 2 * mk.MAX_CHUNK_TOKENS and weight.fmt in CHUNK_FORMATS:
            warps, per_multiprocessor = self.shapes.matvec_chunks
            grid = -(-n_out // warps)
            if per_multiprocessor:
                grid = min(grid, per_multiprocessor * self._multiprocessors)
            for first in range(0, T, mk.MAX_CHUNK_TOKENS):
                n = min(mk.MAX_CHUNK_TOKENS, T - first)
                per_chunk = 8 if weight.fmt == FORMAT_IDS["q8_0"] else 16
                shared = mk.matvec_chunks_shared(n, per_chunk, warps)
                launch = self._launch(mk.matvec_chunks, grid, (LANES, warps), label and "matvec_chunks " + label,
                                      weight.nbytes, shared)
                launch(weight.fmt, weight.parts[1], weight.parts[2], *weight.chunks, x, first, n, bias, out, epilogue)
            return out
        if T <= mk.MAX_FEW_TOKENS:
            lanes, rows = self.shapes.matvec
            launch = self._launch(mk.matvec, (n_out + rows - 1) // rows, (lanes, rows), label and "matvec " + label, weight.nbytes)
        elif (self.tensor_cores if tensor_cores is None else tensor_cores) and weight.fmt in TENSOR_CORE_FORMATS:
            n_in = weight.shape[1]
            codes = self._scratch("codes", (tc.padded(n_out), n_in // 2), np.uint32)
            x_hi = self._scratch("x_hi", (tc.padded(T), n_in // 2), np.uint32)
            x_lo = self._scratch("x_lo", (tc.padded(T), n_in // 2), np.uint32)
            x_sums = self._scratch("x_sums", (tc.padded(T), n_in // 32), np.float32)
            self._flat(tc.half_codes, codes.size, label and "half_codes " + label)(weight.fmt, *weight.parts, n_out, codes)
            self._flat(tc.split_x, x_sums.size, label and "split_x " + label)(x, T, x_hi, x_lo, x_sums)
            launch = self._launch(tc.matmul_tc, tc.grid(T, n_out), tc.THREADS, label and "matmul_tc " + label, weight.nbytes)
            launch(weight.fmt, *weight.parts, codes, x_hi, x_lo, x_sums, T, bias, out, epilogue)
            return out
        else:
            side = self.shapes.matmul_side
            tile = 4 * side
            grid = ((n_out + tile - 1) // tile, (T + tile - 1) // tile)
            launch = self._launch(mk.matmul, grid, (side, side), label and "matmul " + label, weight.nbytes)
        launch(weight.fmt, *weight.parts, x, T, bias, out, epilogue)
        return out

    def layer_norm(self, x, weight, bias, eps: float, out=None):
        out = self.empty(x.shape) if out is None else out
        self._launch(lk.layer_norm, x.shape[0], self.shapes.norm_threads)(x, weight, bias, np.float32(eps), out)
        return out

    def attend(self, qkv, k_cache, v_cache, layer: int, start: int, out) -> None:
        T, E = out.shape
        G, D = k_cache.shape[2], k_cache.shape[3]
        H = E // D
        half = k_cache.dtype == np.uint16
        positions, index = self._device_start(start)
        scale = np.float32(1.0 / math.sqrt(D))
        k_words, v_words = self._cache_words(k_cache), self._cache_words(v_cache)
        if T <= STEP_TOKENS:  # a decode step's: K/V stored by attention, grid by bucket
            splits, per_split = attention_grid(T, start, self.shapes)
            heads = step_heads(H, G, self.shapes)
            groups = H // heads
            launch = self._launch(lk.attention_step, (T, splits, groups), (LANES, heads))
            launch(qkv, k_cache, v_cache, k_words, v_words, layer, positions, index, half, H, scale, per_split, out,
                   *self._attention_parts(T, splits, E, H))
            return
        self._flat(lk.store_kv, T * G * D)(qkv, T, E, k_cache, v_cache, layer, positions, index, half)
        tiles = prompt_tiles(T, H, G)
        splits, per_split = attention_grid(T, start, self.shapes, tiles)
        launch = self._launch(lk.attention, (tiles // G, splits, G), lk.TILE_ROWS * lk.ROW_LANES)
        parts = self._unused_parts if splits == 1 else self._attention_parts(T, splits, E, H)
        launch(qkv, k_cache, v_cache, k_words, v_words, layer, positions, index, half, H, scale, per_split, out, *parts)

    def token_batch(self, caches, rows, starts):
        return list(zip(caches, rows, starts))

    def attend_tokens(self, qkv, batch, layer: int, out) -> None:
        for (k_cache, v_cache), row, start in batch:  # a launch each, as graphs capture them
            self.attend(qkv[row : row + 1], k_cache, v_cache, layer, start, out[row : row + 1])

    def _cache_words(self, cache):
        """An fp16 cache as uint32 words (pairs of values: the attention kernels read them), the same view
        object every call (launches and graphs key arrays by identity); a float32 cache itself."""
        if cache.dtype != np.uint16:
            return cache
        kept = self._words.get(id(cache))
        if kept is not None and kept[0]() is cache:
            return kept[1]
        if len(self._words) > 256:  # caches come and go (a batch's sequences): forget the dead ones
            self._words = {key: value for key, value in self._words.items() if value[0]() is not None}
        view = cache.view(np.uint32)
        try:
            held = weakref.ref(cache)  # the view holds the memory, not the cache object
        except TypeError:
            held = lambda: cache  # noqa: E731 (an array without weak references: kept)
        self._words[id(cache)] = (held, view)
        return view

    def _device_start(self, start: int):
        """(device int64 array, index) holding `start`: one of the positions the last
        `input_embeddings` put on the device (any row holding that value: every sequence of a
        batched step finds its own), else a new one-value array (a caller that embedded nothing)."""
        host, device = self._positions
        if host is not None:
            if len(host) == 1:
                if host[0] == start:
                    return device, 0
            else:
                if self._position_index is None:
                    self._position_index = {int(p): i for i, p in reversed(list(enumerate(host)))}
                index = self._position_index.get(start)
                if index is not None:
                    return device, index
        return cuda.to_device(np.array([start], np.int64)), 0

    def _attention_parts(self, T: int, splits: int, E: int, H: int):
        """Scratch for attention's partial sums [T, splits, E], per-head max and sum
        [T, splits, H], and counts of finished blocks (a token's, [T]; attention_step: a token's
        and group of heads', [T, groups <= H]; zeros, and left so by the kernels), kept for every later call of the same sizes (decode steps', whose graphs hold
        them)."""
        key = (T, splits, E, H)
        if key not in self._parts:
            if len(self._parts) > 64:  # prompts' sizes never recur
                self._parts.clear()
            self._parts[key] = (
                cuda.device_array((T, splits, E), np.float32),
                cuda.device_array((T, splits, H), np.float32),
                cuda.device_array((T, splits, H), np.float32),
                cuda.to_device(np.zeros(T * H, np.int32)),  # attention_step: a count for each (token, group of heads)
            )
        return self._parts[key]

    def forward_context(self, weights, n_tokens: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def token_invariant(self, weights) -> bool:
        """False: one token's products (matvec) sum in another order than a prompt's (matmul)."""
        return False
