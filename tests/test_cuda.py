"""The CUDA backend: every kernel against its NumPy twin, a whole model against the reference and
the CPU backend, and the device choice. Runs on Numba's CUDA simulator in CI (conftest.py turns it
on) and on a real GPU under tools/gpu_check.sh (NUMBA_ENABLE_CUDASIM=0), where the tests marked
`real_gpu` also run: the golden fixtures and the trained fixture, whose 49k-row LM head the
simulator (~20 us a multiply-add) would take minutes a token for.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

import santacpu
from santacpu.backends.cuda import device as cuda_device
from santacpu.errors import SantacpuError
from santacpu.formats.blocks import QuantizedWeight, get_format
from santacpu.formats.split_rows import split_rows
from santacpu.loading.checkpoint import read_checkpoint
from santacpu.loading.random_checkpoint import write_checkpoint
from santacpu.network import reference
from santacpu.network.engine import Engine
from santacpu.backends.cpu.backend import CpuBackend

cuda = pytest.importorskip("numba.cuda")
from santacpu.backends.cuda import layer_kernels as lk  # noqa: E402
from santacpu.backends.cuda import linear_kernels as mk  # noqa: E402
from santacpu.backends.cuda.backend import DEVICE_SHAPES, SIMULATOR_SHAPES, CudaBackend  # noqa: E402
from santacpu.backends.cuda.values import float_to_half, half_to_float  # noqa: E402

REAL_GPU = not cuda_device.simulated()
real_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU (tools/gpu_check.sh runs it there)")
SHAPES = {"device": DEVICE_SHAPES, "simulator": SIMULATOR_SHAPES}
FORMATS = ("float32", "float16", "q8_0", "q4_0", "q6_0", "q4_m")


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _weight(fmt: str, rows: int, cols: int, rng):
    """(stored weight, its float32 values) in format fmt."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt in ("float32", "float16"):
        stored = w.astype(fmt)
        return stored, stored.astype(np.float32)
    quantized = QuantizedWeight(fmt, (rows, cols), get_format(fmt).quantize(w))
    return quantized, quantized.dequantize()


@cuda.jit
def _half_round_trip(values, bits, back):
    i = cuda.grid(1)
    if i < values.shape[0]:
        bits[i] = float_to_half(values[i])
        back[i] = half_to_float(bits[i])


def test_half_conversions_match_numpy():
    rng = np.random.default_rng(1)
    tiny = np.float32(2.0**-24)
    edges = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, np.inf, -np.inf, 6.1035156e-05, 6.0e-05,
             tiny, tiny / 2, tiny * 0.51, 3 * tiny / 2, 1.00048828125, 1.00146484375, 2049.0, 2051.0]
    values = np.concatenate([np.array(edges, np.float32), rng.standard_normal(200).astype(np.float32) * 10.0 ** rng.integers(-8, 5, 200),
                             np.array([np.nan], np.float32)]).astype(np.float32)
    bits = np.zeros(len(values), np.uint16)
    back = np.zeros(len(values), np.float32)
    _half_round_trip[(len(values) + 63) // 64, 64](values, bits, back)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert np.array_equal(bits[:-1], want[:-1].view(np.uint16)), values[bits != want.view(np.uint16)]
    assert np.isnan(back[-1]) and np.array_equal(back[:-1], want[:-1].astype(np.float32))


def _linear_case(fmt, T, shapes, epilogue, rng, rows=12, cols=64):
    backend = CudaBackend(shapes)
    stored, dense = _weight(fmt, rows, cols, rng)
    weight = backend._matrix(stored)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    want = x @ dense.T + bias
    if epilogue == "gelu":
        got = backend.linear(cuda.to_device(x), weight, cuda.to_device(bias), gelu=True)
        want = reference.gelu_tanh(want)
    elif epilogue == "add":
        residual = rng.standard_normal((T, rows)).astype(np.float32)
        target = cuda.to_device(residual)
        got = backend.linear(cuda.to_device(x), weight, cuda.to_device(bias), add_to=target)
        assert got is target
        want = residual + want
    else:
        out = cuda.to_device(np.full((T, rows), np.nan, np.float32))  # poisoned: every element must be written
        got = backend.linear(cuda.to_device(x), weight, cuda.to_device(bias), out=out)
    return _rel(got.copy_to_host(), want)


# T: matvec_one; matvec_chunks (q8_0, q4_0, q6_0) or matvec (the others); matvec_chunks twice (or
# matmul); matmul
TOKEN_COUNTS = [1, 3, mk.MAX_CHUNK_TOKENS + 4, 2 * mk.MAX_CHUNK_TOKENS + 1]
TOKEN_IDS = ["matvec1", "matvec3", "chunks-twice", "matmul"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", TOKEN_COUNTS, ids=TOKEN_IDS)
def test_linear_each_format_matches_numpy(fmt, T):
    assert _linear_case(fmt, T, SIMULATOR_SHAPES, None, np.random.default_rng(2)) < 1e-5


@pytest.mark.parametrize("epilogue", ["gelu", "add"])
@pytest.mark.parametrize("T", TOKEN_COUNTS[1:], ids=TOKEN_IDS[1:])
def test_linear_epilogues(epilogue, T):
    assert _linear_case("q4_0", T, SIMULATOR_SHAPES, epilogue, np.random.default_rng(3)) < 1e-5


@pytest.mark.parametrize(
    "T, shapes", [(1, DEVICE_SHAPES), (1, SIMULATOR_SHAPES), (3, SIMULATOR_SHAPES)],
    ids=["fused-device", "fused-simulator", "separate"],
)
def test_linear_after_layer_norm(T, shapes):
    """linear(..., norm=...): one token's LayerNorm fused into matvec_one, or a LayerNorm launch."""
    rng = np.random.default_rng(9)
    backend = CudaBackend(shapes)
    stored, dense = _weight("q4_0", 10, 96, rng)
    x = (rng.standard_normal((T, 96)) * 2 + 0.5).astype(np.float32)
    w, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    got = backend.linear(cuda.to_device(x), backend._matrix(stored), cuda.to_device(bias),
                         norm=(cuda.to_device(w), cuda.to_device(b), 1e-5))
    assert _rel(got.copy_to_host(), reference.layer_norm(x, w, b, 1e-5) @ dense.T + bias) < 1e-5


@pytest.mark.parametrize("T", [1, 9, 2 * mk.MAX_CHUNK_TOKENS + 8], ids=["matvec1", "chunks", "matmul"])
def test_linear_with_the_gpu_launch_shapes(T):
    """The launch shapes a GPU gets (8 or 16 warps a block, 16 x 16 tiles): rows and tokens past
    the matrix's end, and a row longer than the lanes (than a tile of chunks)."""
    cols = 33 * 32 if T < 32 else 64  # more chunks in a row than lanes
    assert _linear_case("q6_0", T, DEVICE_SHAPES, None, np.random.default_rng(4), rows=9, cols=cols) < 1e-5


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "q6_0"])
def test_matvec_one_long_rows_and_row_strides(fmt):
    """matvec_one on rows of several sets of 4 chunks a lane (the next set's loads in flight,
    then the next row's), a grid smaller than rows / warps (blocks take rows by a stride), and a
    row count that leaves warps idle; the add epilogue."""
    rng = np.random.default_rng(10)
    shapes = dataclasses.replace(SIMULATOR_SHAPES, matvec_one=(2, 1))  # one block: rows 0, 1, then 2, 3, ...
    assert _linear_case(fmt, 1, shapes, "add", rng, rows=5, cols=65 * 32) < 1e-5


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_layer_norm(shapes):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 96)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    got = CudaBackend(shapes).layer_norm(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), 1e-5)
    assert _rel(got.copy_to_host(), reference.layer_norm(x, w, b, 1e-5)) < 1e-5


@pytest.mark.parametrize("fmt", ["float32", "float16", "q8_0", "q4_m"])
def test_input_embeddings(fmt):
    rng = np.random.default_rng(6)
    backend = CudaBackend()
    wte_stored, wte = _weight(fmt, 20, 64, rng)
    wpe_stored, wpe = _weight("float32", 16, 64, rng)
    ids, positions = np.array([3, 19, 0, 3]), np.array([5, 6, 7, 8])
    got = backend.input_embeddings(backend._matrix(wte_stored), backend._matrix(wpe_stored), ids, positions)
    # read through the backend: a step's launches (recorded for a CUDA graph on a GPU) run then
    assert _rel(backend.to_host(got), wte[ids] + wpe[positions]) < 1e-6  # a GPU may fuse the scale and add


def _attention_reference(q, k, v):
    """q [T, H, D] at the last T positions of k, v [P, G, D] -> [T, H*D], causal."""
    T, H, D = q.shape
    P, G, _ = k.shape
    out = np.empty((T, H, D), np.float32)
    for t in range(T):
        n = P - T + t + 1
        for h in range(H):
            g = h // (H // G)
            s = k[:n, g] @ q[t, h] / np.float32(math.sqrt(D))
            e = np.exp(s - s.max())
            out[t, h] = (e / e.sum()) @ v[:n, g]
    return out.reshape(T, H * D)


@pytest.mark.parametrize(
    "kv_dtype, shapes, G, H, D, in_attention",
    [("float16", SIMULATOR_SHAPES, 1, 4, 16, True), ("float32", SIMULATOR_SHAPES, 2, 4, 16, True),
     ("float16", DEVICE_SHAPES, 1, 4, 16, True),
     ("float16", SIMULATOR_SHAPES, 1, 4, 16, False), ("float32", SIMULATOR_SHAPES, 2, 4, 16, False),
     ("float16", DEVICE_SHAPES, 1, 4, 16, False), ("float32", DEVICE_SHAPES, 2, 6, 16, False),
     ("float16", SIMULATOR_SHAPES, 1, 2, lk.MAX_HEAD_DIM, False), ("float16", SIMULATOR_SHAPES, 1, 3, 6, False),
     ("float16", SIMULATOR_SHAPES, 1, 3, 6, True)],
    ids=["fp16-mqa", "fp32-two-kv-heads", "fp16-gpu-shapes", "fp16-prompt-kernel", "fp32-prompt-kernel",
         "fp16-prompt-kernel-splits", "fp32-prompt-kernel-splits-rows-across-tokens", "fp16-prompt-kernel-widest-heads",
         "fp16-prompt-kernel-head-dim-6", "fp16-head-dim-6"],
)
def test_attend_stores_and_attends(kv_dtype, shapes, G, H, D, in_attention, monkeypatch):
    """Rows already cached (written here), then two calls (a few tokens, then one) that store
    their own rows and attend past a chunk of lanes, each against the causal softmax in NumPy
    over what the cache holds. Decode steps' calls store K/V inside the attention kernel (which
    reads the new rows from qkv, rounded as the cache rounds them); longer calls launch
    `store_kv` first, then the prompt kernel (`in_attention=False`: every call taken as a long
    one). With the GPU's shapes the grid covers the position bucket (a step's: splits past the
    positions add nothing), or splits a prompt's positions in two (one token's second split has
    none of its positions); with 3 query heads a K/V head, the prompt kernel's tiles of query
    rows hold pieces of two tokens; with heads of MAX_HEAD_DIM its lanes stage whole rows at
    once. With 6 dims (not a multiple of 4) both kernels score the last 2 one at a time."""
    from santacpu.backends.cuda import backend as cuda_backend

    if not in_attention:
        monkeypatch.setattr(cuda_backend, "STEP_TOKENS", 0)
    rng = np.random.default_rng(7)
    L, n_ctx, layer, stored = 2, 40, 1, np.dtype(kv_dtype)
    E = H * D
    backend = CudaBackend(shapes)
    start = lk.CHUNK - 2  # rows 0..start-1 are "earlier calls'"; the calls cross a chunk
    k = (rng.standard_normal((start, G, D))).astype(stored)
    v = (rng.standard_normal((start, G, D))).astype(stored)
    host_k, host_v = np.zeros((L, n_ctx, G, D), stored), np.zeros((L, n_ctx, G, D), stored)
    host_k[layer, :start], host_v[layer, :start] = k, v
    as_stored = (lambda a: a.view(np.uint16)) if kv_dtype == "float16" else (lambda a: a)
    k_cache, v_cache = cuda.to_device(as_stored(host_k)), cuda.to_device(as_stored(host_v))
    for T in (3, 1):
        qkv = rng.standard_normal((T, E + 2 * G * D)).astype(np.float32)
        out = cuda.to_device(np.full((T, E), np.nan, np.float32))
        backend.attend(cuda.to_device(qkv), k_cache, v_cache, layer, start, out)
        k = np.concatenate([k, qkv[:, E : E + G * D].reshape(T, G, D).astype(stored)])
        v = np.concatenate([v, qkv[:, E + G * D :].reshape(T, G, D).astype(stored)])
        held = backend.to_host(k_cache)[layer, : start + T]
        assert np.array_equal(held.view(np.float16) if kv_dtype == "float16" else held, k)
        want = _attention_reference(qkv[:, :E].reshape(T, H, D), k.astype(np.float32), v.astype(np.float32))
        assert _rel(out.copy_to_host(), want) < 1e-5
        start += T
    # the last call again (it stores the same rows): its scratch, and the count of finished blocks
    # that picks the one that adds the splits up, serve a second call
    again = cuda.to_device(np.full((1, E), np.nan, np.float32))
    backend.attend(cuda.to_device(qkv), k_cache, v_cache, layer, start - 1, again)
    assert _rel(again.copy_to_host(), want) < 1e-5


def test_kv_prefix_copy_and_take_rows():
    backend = CudaBackend()
    rng = np.random.default_rng(8)
    source = rng.integers(0, 60000, (2, 10, 1, 16)).astype(np.uint16)
    target = backend.new_kv((2, 6, 1, 16), "float16")
    backend.copy_kv_prefix(target, cuda.to_device(source), 5)
    assert np.array_equal(backend.to_host(target)[:, :5], source[:, :5])
    x = rng.standard_normal((6, 8)).astype(np.float32)
    for rows in ([1, 2, 3], [0, 4, 5]):
        assert np.array_equal(backend.to_host(backend.take_rows(cuda.to_device(x), rows)), x[rows])


def test_copy_kernel():
    data = np.arange(1000, dtype=np.int64)
    target = cuda.device_array_like(data)
    lk.copy[2, 64](cuda.to_device(data), target)
    assert np.array_equal(target.copy_to_host(), data)


# --- whole models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_weights(tmp_path_factory):
    """The "sim" random model (vocabulary 64) in float32, and its matrices quantized."""
    folder = write_checkpoint(tmp_path_factory.mktemp("sim"), size="sim", with_tokenizer=False)
    weights = read_checkpoint(folder)

    def quantized(qtype):
        def q(w):
            return QuantizedWeight(qtype, w.shape, get_format(qtype).quantize(w))

        layers = [
            type(layer)(**{name: (q(value) if value.ndim == 2 else value) for name, value in vars(layer).items()})
            for layer in weights.layers
        ]
        return type(weights)(weights.config, q(weights.wte), weights.wpe, layers, weights.ln_f_weight, weights.ln_f_bias)

    q4_0 = quantized("q4_0")
    rows = dataclasses.replace(q4_0, wte=split_rows(weights.wte, [3, 17, 60], "q8_0", "q6_0"))  # widened to q8_0 on the device
    return {"float32": weights, "q8_0": quantized("q8_0"), "q4_0": q4_0, "q4_0+rows": rows}


IDS = [5, 17, 3, 60, 22, 9, 41, 7, 33, 12, 2, 50]


@pytest.mark.parametrize(
    "weights_type, kv_dtype, tolerance, calls",
    [("float32", "float32", 1e-4, (9, 2, 1)), ("q4_0", "float16", 1e-3, (9, 1)), ("q4_0+rows", "float32", 1e-3, (4, 1))],
    ids=["fp32-kv", "fp16-kv", "split-embedding-rows"],
)
def test_model_forward_matches_reference(sim_weights, weights_type, kv_dtype, tolerance, calls):
    """A prompt (the matmul path), a few tokens (matvec), then one token (matvec_one, LayerNorm
    fused), through one cache: every position's logits against the NumPy reference's."""
    weights = sim_weights[weights_type]
    engine = Engine(weights, CudaBackend(), kv_dtype)
    cache = engine.new_cache(16)
    got, done = [], 0
    for n in calls:
        got.append(engine.forward(cache, IDS[done : done + n], all_logits=True))
        done += n
    assert _rel(np.concatenate(got), reference.forward(weights, IDS[:done])) < tolerance


def _greedy(engine, prompt, steps):
    cache = engine.new_cache(len(prompt) + steps)
    logits = engine.forward(cache, prompt)[-1]
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        logits = engine.forward(cache, [out[-1]])[-1]
    return out


def test_greedy_ids_match_the_cpu(sim_weights):
    weights = sim_weights["q4_0"]
    cpu = _greedy(Engine(weights, CpuBackend()), IDS[:2], 3)
    assert _greedy(Engine(weights, CudaBackend()), IDS[:2], 3) == cpu


def test_batched_step_matches_single_steps(sim_weights):
    """forward_batch over two sequences (distinct lengths, one with all logits) on the device
    caches gives each sequence what its own forward gives; a resized cache carries on."""
    engine = Engine(sim_weights["q8_0"], CudaBackend(), "float32")
    a, b = engine.new_cache(12), engine.new_cache(12)
    engine.forward(a, IDS[:2])
    engine.forward(b, IDS[2:4])
    bigger = a.resized(20)  # a copy of a's K/V on the device
    both = engine.forward_batch([a, b], [[7], [8, 9]], [False, True])
    assert _rel(both[0], engine.forward(bigger, [7])) < 1e-5
    solo_b = engine.new_cache(12)
    engine.forward(solo_b, IDS[2:4])
    assert _rel(both[1], engine.forward(solo_b, [8, 9], all_logits=True)) < 1e-5


# --- the device choice ----------------------------------------------------------------------------


def test_auto_picks_the_gpu_when_one_is_usable(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(cuda_device, "gpu_missing", lambda: None)
    model = santacpu.load(tiny_checkpoint(), quant="none", device="auto")
    assert model.engine.backend.name == "cuda" and model.device.startswith("cuda: ")


def test_auto_picks_the_cpu_without_a_gpu(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(cuda_device, "gpu_missing", lambda: "no NVIDIA driver found")
    model = santacpu.load(tiny_checkpoint(), quant="none", device="auto")
    assert model.engine.backend.name == "cpu" and model.device == "cpu: float kernels (no block-quantized matrices)"


def test_cuda_without_a_gpu_is_one_line(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(cuda_device, "cuda_missing", lambda: "no NVIDIA driver found (libcuda.so.1 cannot be loaded)")
    with pytest.raises(SantacpuError, match=r"^device 'cuda' is not usable: no NVIDIA driver found"):
        santacpu.load(tiny_checkpoint(), quant="none", device="cuda")
    with pytest.raises(SantacpuError, match="unknown device 'tpu'"):
        santacpu.load(tiny_checkpoint(), quant="none", device="tpu")


@pytest.mark.skipif(REAL_GPU, reason="this machine has a usable GPU")
def test_cli_cuda_without_a_gpu_is_one_line(tiny_checkpoint):
    from helpers import one_error_line, run_santacpu

    done = run_santacpu("complete", "def f():", "--model", str(tiny_checkpoint()), "--device", "cuda",
                        env={"NUMBA_ENABLE_CUDASIM": "0"})
    assert "device 'cuda' is not usable: " in one_error_line(done, "device 'cuda' is not usable")


def test_the_simulator_is_never_auto(monkeypatch):
    if REAL_GPU:
        assert cuda_device.gpu_missing() is None
    else:
        assert "simulator" in cuda_device.gpu_missing()


# --- on a real GPU only (tools/gpu_check.sh) ------------------------------------------------------------


@real_gpu
@pytest.mark.parametrize("kv_dtype, tolerance", [("float32", 1e-4), ("float16", 1e-3)])
def test_golden_fixtures_on_the_gpu(tiny_checkpoint, kv_dtype, tolerance):
    weights = read_checkpoint(tiny_checkpoint())
    ids = list(range(100, 140))
    engine = Engine(weights, CudaBackend(), kv_dtype)
    cache = engine.new_cache(len(ids))
    got = np.concatenate([engine.forward(cache, ids[:30], all_logits=True), engine.forward(cache, ids[30:], all_logits=True)])
    assert _rel(got, reference.forward(weights, ids)) < tolerance


@real_gpu
def test_trained_fixture_greedy_on_the_gpu():
    folder = Path(__file__).parent / "fixtures" / "trained_tiny"
    cpu = santacpu.load(folder, quant="none", device="cpu")
    gpu = santacpu.load(folder, quant="none", device="cuda")
    prompt = "def fibonacci(n):\n"
    want = cpu.complete(prompt, max_new_tokens=32, lookup=False)
    assert gpu.complete(prompt, max_new_tokens=32) == want


def test_launcher_reuses_prepared_arrays_and_converts_scalars():
    """The fast launch path's bookkeeping, with a stand-in for numba-cuda's kernel objects: a
    site is prepared the second time its arrays recur, scalars are converted every call, other
    arrays take the plain launch, and a site that cannot be prepared keeps the plain launch."""
    from santacpu.backends.cuda.launch import Launcher

    class ArrayType:
        pass

    ARRAY, INT = ArrayType(), "int64"
    plain, driver = [], []

    class Kernel:
        cooperative = False
        _codelibrary = type("Library", (), {"get_cufunc": lambda self: type("Function", (), {"kernel": "f"})()})()

        def _prepare_args(self, ty, value, stream, retr, out):
            out.append(("array", id(value)) if ty is ARRAY else ("scalar", value))

    class Dispatcher:
        overloads = {(ARRAY, INT): Kernel()}

        def typeof_pyval(self, value):
            return INT if isinstance(value, int) else ARRAY

    class Configured:
        dispatcher, stream, griddim, blockdim, sharedmem = Dispatcher(), "stream", (1,), (32,), 0

        def __call__(self, *args):
            plain.append(args)

    launcher = Launcher(enabled=False)  # then given stand-ins for numba-cuda's pieces
    launcher.enabled, launcher._array_type, launcher._core_ge_1 = True, ArrayType, True
    launcher._config_class = lambda **config: config
    launcher._launch = lambda stream, config, function, *params: driver.append(params)
    configured, a, b = Configured(), object(), object()
    for start in (3, 4, 5):
        launcher(configured, (a, start))
    launcher(configured, (b, 6))
    assert [p[1] for p in plain] == [3, 4, 6] and launcher.fast_launches == 1
    assert driver == [(("array", id(a)), ("scalar", 5))]
    Dispatcher.overloads = {}  # cannot be prepared: the plain launch stays
    for start in (7, 8, 9):
        launcher(configured, (b, start))
    assert [p[1] for p in plain][-3:] == [7, 8, 9] and launcher.fast_launches == 1


@pytest.mark.skipif(REAL_GPU, reason="the simulator's own shared arrays")
def test_a_blocks_threads_get_one_shared_array_however_they_interleave():
    # Numba's simulator looks a line's shared array up and stores it without a lock; values.py
    # puts one around it. Threads that all miss at once must still share one array: a length
    # that sleeps while the array is made holds every thread in that window.
    import threading
    import time

    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    class SlowLength:
        def __index__(self):
            time.sleep(0.002)
            return 8

    shared, start, got = FakeCUDAShared(0), threading.Barrier(8), []

    def thread():
        start.wait()
        got.append(shared.array(SlowLength(), np.float32))  # one line: one array for the block

    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(a is got[0] for a in got)
    assert shared.array(8, np.float32) is not got[0]  # another line: its own array


# --- prompts on tensor cores (tensor_cores.py): mma.sync on a GPU; under the simulator a Python
# twin fed by the same fragment loads, placing them as the PTX ISA does ----------------------------


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q6_0", "q4_m"])
def test_tensor_core_products_match_numpy(fmt):
    """One tile, with rows and tokens past the matrix's end; x split into fp16 halves keeps fp32's
    accuracy (plain fp16 x would be ~1e-3 off)."""
    from santacpu.backends.cuda import tensor_cores as tc

    rng = np.random.default_rng(11)
    backend = CudaBackend(tensor_cores=True)
    rows, cols, T = 40, 64, 2 * mk.MAX_CHUNK_TOKENS + 5  # past the few-token kernels: a prompt's product
    stored, dense = _weight(fmt, rows, cols, rng)
    x = (rng.standard_normal((T, cols)) * 4).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    gelu = fmt == "q4_m"
    got = backend.linear(cuda.to_device(x), backend._matrix(stored), cuda.to_device(bias), gelu=gelu).copy_to_host()
    want = x.astype(np.float64) @ dense.T.astype(np.float64) + bias
    assert _rel(got, reference.gelu_tanh(want) if gelu else want) < 1e-5
    assert [key[0] for key in backend._launches] == [tc.half_codes, tc.split_x, tc.matmul_tc]


def test_tensor_core_scratch_is_reused():
    """The staged operands' scratch: one view object per shape (a decode step's arrays must recur
    for its CUDA graph), views of one buffer until a larger shape grows it."""
    backend = CudaBackend()
    small = backend._scratch("codes", (64, 8), np.uint32)
    assert backend._scratch("codes", (64, 8), np.uint32) is small
    other = backend._scratch("codes", (32, 8), np.uint32)
    assert other.shape == (32, 8) and other is not small
    large = backend._scratch("codes", (128, 16), np.uint32)
    assert large.shape == (128, 16) and backend._scratch("codes", (64, 8), np.uint32) is not small
    assert backend._scratch("x_sums", (64, 2), np.float32).dtype == np.float32


def test_tensor_cores_self_check_and_choice():
    """The self-check (2 x 2 tiles against the fp32 tiles) passes; the simulator never chooses
    them by itself (a GPU does by its capability), float weights never take them."""
    from santacpu.backends.cuda import tensor_cores as tc

    backend = CudaBackend()
    assert backend.tensor_cores is None and "prompts on fp32 tiles" in backend.describe()
    assert backend.tensor_core_self_check() == (True, None)
    if REAL_GPU:
        capability = cuda.get_current_device().compute_capability
        assert backend._tensor_cores_usable()[0] == tc.supported(capability)
    else:
        assert backend._tensor_cores_usable() == (False, "the simulator runs the fp32 tiles unless asked (tests ask)")
    assert not tc.supported((7, 5)) and tc.supported((8, 0)) and tc.supported((9, 0))
    on = CudaBackend(tensor_cores=True)
    rng = np.random.default_rng(12)
    stored, dense = _weight("float16", 8, 64, rng)
    x = rng.standard_normal((2 * mk.MAX_CHUNK_TOKENS + 1, 64)).astype(np.float32)
    got = on.linear(cuda.to_device(x), on._matrix(stored), None).copy_to_host()
    assert _rel(got, x @ dense.T) < 1e-5 and [key[0] for key in on._launches] == [mk.matmul]
    off = CudaBackend(tensor_cores=False)
    assert off.tensor_core_reason == "turned off" and "prompts on fp32 tiles (turned off)" in off.describe()
