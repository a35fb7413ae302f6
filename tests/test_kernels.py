"""Every Numba kernel against its plain-NumPy twin, and the incremental engine against the
reference forward at every position."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import tiny_checkpoint
import santacpu
from santacpu import SantacpuError
from santacpu.backends.cpu import cpu_kernels as k, kernels
from santacpu.network import reference
from santacpu.backends.cpu.backend import BLAS_MIN_TOKENS, CpuBackend
from santacpu.loading.checkpoint import read_checkpoint
from santacpu.network.engine import Engine

# The threaded paths are what these tests check: every core, not a worker's one thread (conftest).
pytestmark = pytest.mark.usefixtures("all_cores")

rng = np.random.default_rng(1234)


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("n_out,n_in", [(7, 64), (33, 100), (256, 2048), (5, 31), (3, 16), (1, 5)])
def test_matvec_f16_matches_numpy(n_out, n_in):
    # Shapes cover whole and partial row blocks (ROWS), and rows shorter than a vector.
    x = rng.standard_normal(n_in).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    out = np.empty(n_out, np.float32)
    w16 = rng.standard_normal((n_out, n_in)).astype(np.float16)
    k.matvec_f16(w16.view(np.uint16), x, bias, out)
    want16 = w16.astype(np.float64) @ x + bias  # exact fp16 values, fp32 arithmetic
    assert rel_err(out, want16) < 1e-5


def test_f16_widening_is_exact_for_every_half_value():
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.empty((256, 256), np.float32)
    k.f16_rows_to_f32(bits, 0, 256, out)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    assert np.array_equal(out[finite], want[finite])
    assert np.array_equal(np.isnan(out), np.isnan(want))
    assert np.array_equal(out[np.isinf(want)], want[np.isinf(want)])


def test_layer_norm_and_gelu_match_reference():
    x = (rng.standard_normal((5, 96)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    k.layer_norm(x, w, b, np.float32(1e-5), out)
    assert rel_err(out, reference.layer_norm(x, w, b, 1e-5)) < 1e-5
    serial = np.empty_like(x)
    k.layer_norm_serial(x, w, b, np.float32(1e-5), serial)
    assert np.array_equal(serial, out)

    y = x.copy()
    k.gelu_tanh_inplace(y)
    assert rel_err(y, reference.gelu_tanh(x)) < 1e-5
    # the serial twin and one row cut across threads (decode) give the same bits as the rows
    y_serial = x.copy()
    k.gelu_tanh_inplace_serial(y_serial)
    assert np.array_equal(y_serial, y)
    for parts in (2, 3):
        row = x[1].copy()
        k.gelu_tanh_split(row, parts)
        assert np.array_equal(row, y[1])


def test_gelu_is_accurate_elementwise_over_the_whole_range():
    # The kernel computes tanh through its own exp2 polynomial: check every element, from the
    # saturated tails (GELU(-60) is ~0, GELU(60) = 60) through the steep middle.
    x = np.concatenate([np.linspace(-60, 60, 24001), np.array([0.0, -1e-30, 1e-30, -9.0, 9.0])])
    x = x.astype(np.float32).reshape(1, -1)
    y = x.copy()
    k.gelu_tanh_inplace(y)
    x64 = x.astype(np.float64)
    u = np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)
    # 0.5 * (1 + tanh(u)) == 1 / (1 + exp(-2u)), in float64; the tanh form rounds the far
    # negative tail to 0 even in float64, so it cannot judge the tail's relative error.
    with np.errstate(over="ignore"):
        want = x64 / (1 + np.exp(-2 * u))
    assert np.all(np.isfinite(y))
    # Relative error bound: float32 rounding of the argument u (~6e-8 relative) is amplified by
    # |2u| where exp(-2u) dominates (measured worst 5e-6 at x = -8.5, where |2u| = 57). Results
    # below 1e-30 (x < -9) are judged absolutely: exp2 clamps at 2**126 there.
    assert np.all(np.abs(y - want) <= 1.5e-7 * (1 + 2 * np.abs(u)) * np.abs(want) + 1e-30)
    assert y[0, -1] == np.float32(9.0) and abs(y[0, 0]) < 1e-30
    assert rel_err(y, reference.gelu_tanh(x)) < 1e-6


@pytest.mark.parametrize("head_splits", [1, 3])  # 3: uneven parts, and parts with no heads
@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
@pytest.mark.parametrize("n_kv_head", [1, 4])
# Positions seen: from 1 up to 35, fewer than, equal to and past multiples of KEY_LANES (16).
@pytest.mark.parametrize("start,T", [(0, 1), (0, 9), (5, 1), (13, 4), (31, 5)])
@pytest.mark.parametrize("D", [16, 20])  # 20: values past the last whole vector of 16
def test_causal_attention_matches_dense_softmax(head_splits, cache_dtype, n_kv_head, start, T, D):
    H, n_ctx = 8, 40
    q = (rng.standard_normal((T, H, D)) * 2).astype(np.float32)  # * 2: peaky softmaxes too
    k_cache = rng.standard_normal((n_ctx, n_kv_head, D)).astype(cache_dtype)
    v_cache = rng.standard_normal((n_ctx, n_kv_head, D)).astype(cache_dtype)
    out = np.empty_like(q)
    if cache_dtype == "float16":  # the kernel takes fp16 caches as their bits
        k.causal_attention(q, k_cache.view(np.uint16), v_cache.view(np.uint16), start, out, head_splits)
    else:
        k.causal_attention(q, k_cache, v_cache, start, out, head_splits)
    k_cache, v_cache = k_cache.astype(np.float64), v_cache.astype(np.float64)
    group = H // n_kv_head
    for t in range(T):
        for h in range(H):
            keys = k_cache[: start + t + 1, h // group]  # positions this query may see
            p = reference.softmax(keys @ q[t, h] / np.sqrt(D))
            assert rel_err(out[t, h], p @ v_cache[: start + t + 1, h // group]) < 1e-5


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
@pytest.mark.parametrize("start,T", [(0, 2), (3, BLAS_MIN_TOKENS + 13)])
def test_attention_gives_each_query_the_same_bits_in_any_call(cache_dtype, start, T):
    # A prompt's queries, and each query alone as decoding would run it (its heads split across
    # threads): equal bit for bit, so cached and drafted tokens match plain decoding exactly.
    H, D, n_ctx = 16, 64, BLAS_MIN_TOKENS + 64
    q = (rng.standard_normal((T, H, D)) * 2).astype(np.float32)
    k_cache = rng.standard_normal((n_ctx, 1, D)).astype(cache_dtype)
    v_cache = rng.standard_normal((n_ctx, 1, D)).astype(cache_dtype)
    backend = CpuBackend()
    together = backend.attention(q, k_cache, v_cache, start)
    for t in range(T):
        alone = np.empty((1, H, D), np.float32)
        bits = (lambda a: a.view(np.uint16)) if cache_dtype == "float16" else (lambda a: a)
        k.causal_attention(q[t : t + 1], bits(k_cache), bits(v_cache), start + t, alone, 2)
        assert np.array_equal(alone[0], together[t]), t


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
@pytest.mark.parametrize("n_kv_head,D", [(1, 64), (2, 20)])
def test_a_batched_steps_tokens_attend_in_one_call_with_each_sequences_bits(cache_dtype, n_kv_head, D, threads, all_cores):
    # One new token of each of several sequences (caches of their own, of different capacities and
    # lengths: empty, below, at and past multiples of KEY_LANES), their rows scattered among a
    # step's other rows: each sequence's stored K/V row and its attention equal `attend` for it
    # alone, bit for bit; the other rows of `out` are left as they were.
    G, E = n_kv_head, 8 * D
    starts, capacities, rows = [0, 15, 16, 37, 3], [1, 20, 17, 40, 9], [4, 0, 6, 2, 5]
    T = 7
    qkv = (rng.standard_normal((T, E + 2 * G * D)) * 2).astype(np.float32)
    qkv[0, E] = 70000.0  # past float16's range: inf in the cache, as NumPy's rounding makes it (NaN out)
    qkv[0, E + 1 : E + 6] = [3e-6, 65519.0, 65520.0, -0.0, 1e-9]  # a subnormal, float16's largest, inf, -0, 0
    caches = []
    for start, capacity in zip(starts, capacities):
        pair = tuple((rng.standard_normal((2, capacity, G, D)) * 0.5).astype(cache_dtype) for _ in range(2))
        caches.append(pair)
    alone = [tuple(a.copy() for a in pair) for pair in caches]
    backend = CpuBackend()
    out = np.full((T, E), np.float32(7.0))
    with kernels.numba_threads(threads), np.errstate(over="ignore"):
        backend.attend_tokens(qkv, backend.token_batch(caches, rows, starts), 1, out)
    for (k_cache, v_cache), (k_alone, v_alone), row, start in zip(caches, alone, rows, starts):
        want = np.empty((1, E), np.float32)
        with np.errstate(over="ignore"):
            backend.attend(qkv[row : row + 1], k_alone, v_alone, 1, start, want)
        same_bits = lambda a, b: np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))  # noqa: E731 (NaN too)
        assert same_bits(k_cache, k_alone) and same_bits(v_cache, v_alone), start
        assert same_bits(out[row], want[0]), start
    assert np.all(out[[1, 3]] == 7.0)
    with pytest.raises(ValueError, match="room for its token"):  # never written past a cache's end
        backend.token_batch(caches[:2], [0, 1], [0, 20])
    with pytest.raises(ValueError, match="room for its token"):
        backend.token_batch([caches[0], (caches[1][0][:, ::2], caches[1][1])], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="float16 or float32"):
        backend.token_batch([tuple(a.astype(np.float64) for a in pair) for pair in caches[:2]], [0, 1], [0, 1])
    batch = backend.token_batch(caches[:2], [0, 7], [0, 1])
    with pytest.raises(ValueError, match="holding its rows"):  # out has 7 rows
        backend.attend_tokens(qkv, batch, 1, out)
    with pytest.raises(ValueError, match="a layer of the caches"):
        backend.attend_tokens(qkv, backend.token_batch(caches[:2], [0, 1], [0, 1]), 2, out)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("T", [1, 2, BLAS_MIN_TOKENS - 1, BLAS_MIN_TOKENS, 40])
def test_backend_linear_every_path(dtype, T):
    w = rng.standard_normal((1100, 64)).astype(dtype)  # > one fp16 BLAS tile of rows
    x = rng.standard_normal((T, 64)).astype(np.float32)
    b = rng.standard_normal(1100).astype(np.float32)
    got = CpuBackend().linear(x, w, b)
    assert got.shape == (T, 1100) and got.dtype == np.float32
    assert rel_err(got, x.astype(np.float64) @ w.astype(np.float64).T + b) < 1e-5


@pytest.mark.parametrize(
    "kind",
    [
        dict(layout="gpt_bigcode"),
        dict(layout="legacy"),
        dict(layout="gpt_bigcode", dtype="float16"),
        dict(layout="gpt_bigcode", multi_query=False),
    ],
    ids=["bigcode-f32", "legacy-f32", "bigcode-f16", "bigcode-mha"],
)
# The fp32 KV cache must match the oracle to float32 rounding; the fp16 one (the default) adds
# K/V rounding to 11 significant bits: measured 5.6e-4 of the logits' scale on these random tiny
# models (on the trained fixture its KL divergence is bounded in tests/test_quant_accuracy.py).
@pytest.mark.parametrize("kv_dtype,tolerance", [("float32", 1e-4), ("float16", 2e-3)])
def test_incremental_engine_equals_reference_at_every_position(kind, kv_dtype, tolerance):
    weights = read_checkpoint(tiny_checkpoint(**kind))
    ids = [int(i) for i in rng.integers(0, 49157, 48)]
    want = reference.forward(weights, ids)
    scale = np.abs(want).max()
    engine = Engine(weights, CpuBackend(), kv_dtype=kv_dtype)

    cache = engine.new_cache()
    assert cache.k.dtype == kv_dtype
    whole = engine.forward(cache, ids, all_logits=True)
    assert np.abs(whole - want).max() <= tolerance * scale

    # Prefill 20 tokens, then one token at a time: every position's logits agree.
    cache = engine.new_cache()
    pieces = [engine.forward(cache, ids[:20], all_logits=True)]
    pieces += [engine.forward(cache, [t]) for t in ids[20:]]
    assert np.abs(np.concatenate(pieces) - want).max() <= tolerance * scale
    assert cache.ids == ids


def test_kv_cache_is_single_headed_for_multi_query():
    weights = read_checkpoint(tiny_checkpoint())
    c = weights.config
    cache = Engine(weights, CpuBackend()).new_cache()
    assert c.n_kv_head == 1 and c.n_head > 1
    assert cache.k.shape == (c.n_layer, c.n_positions, 1, c.head_dim)
    assert cache.v.shape == cache.k.shape
    assert cache.k.dtype == cache.v.dtype == np.float16  # the default: half the memory of fp32
    with pytest.raises(SantacpuError, match="unknown KV cache type"):
        Engine(weights, CpuBackend(), kv_dtype="int8")
    # load() refuses it before reading anything: the missing model below is never looked at.
    with pytest.raises(SantacpuError, match="unknown KV cache type"):
        santacpu.load("/nonexistent/model", kv_cache="int8")


@pytest.mark.parametrize("min_work", [0, 1 << 62], ids=["all-parallel", "all-on-one-thread"])
def test_engine_is_the_same_whichever_threads_run_the_kernels(monkeypatch, min_work):
    import santacpu.backends.cpu.backend as backend_module

    monkeypatch.setattr(backend_module, "PARALLEL_MIN_WORK", min_work)
    weights = read_checkpoint(tiny_checkpoint())
    ids = [int(i) for i in rng.integers(0, 49157, 30)]
    want = reference.forward(weights, ids)
    engine = Engine(weights, CpuBackend(), kv_dtype="float32")
    cache = engine.new_cache()
    got = np.concatenate([engine.forward(cache, ids[:20], all_logits=True)] + [engine.forward(cache, [t]) for t in ids[20:]])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_long_prefill_crosses_chunks(monkeypatch):
    import santacpu.network.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 16)
    weights = read_checkpoint(tiny_checkpoint())
    ids = [int(i) for i in rng.integers(0, 49157, 50)]
    engine = Engine(weights, CpuBackend(), kv_dtype="float32")
    want = reference.forward(weights, ids)
    assert np.abs(engine.forward(engine.new_cache(), ids, all_logits=True) - want).max() <= 1e-4 * np.abs(want).max()
    last = engine.forward(engine.new_cache(), ids)
    assert last.shape == (1, weights.config.vocab_size)
    assert np.abs(last[0] - want[-1]).max() <= 1e-4 * np.abs(want).max()


def test_importing_santacpu_changes_no_numba_setting():
    """The CPU backend chooses its target when a backend is made: importing it (and making one)
    leaves Numba's target features as the user set them."""
    code = (
        "import numba; before = (numba.config.CPU_NAME, numba.config.CPU_FEATURES)\n"
        "import santacpu, santacpu.backends.cpu.backend as b; b.CpuBackend()\n"
        "assert (numba.config.CPU_NAME, numba.config.CPU_FEATURES) == before, numba.config.CPU_FEATURES\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")})
