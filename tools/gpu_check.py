"""The CUDA backend's checks on a real GPU, in one run (tools/gpu_check.sh calls it; see there).

1. Starts building the full-size random checkpoint and its q8_0 / q4_0 files (in the background),
   and meanwhile times the decode kernels' launch shapes on full-size shapes (`kernel_variants`:
   which of backend.MATVEC_ONE / MATVEC_CHUNKS / ATTENTION_STEP's candidates is fastest; about a
   minute, compiling included: what is left is skipped, q4_0 first).
2. Runs tests/test_cuda.py and tests/test_cuda_graphs.py on the GPU (NUMBA_ENABLE_CUDASIM=0):
   every kernel against its NumPy twin with the GPU's launch shapes, the sim model, real CUDA
   graphs against plain launches (the same logits to the bit), the golden fixtures (fp32 KV
   within 1e-4, fp16 within 1e-3) and the trained fixture's greedy text against the CPU's.
3. The trained fixture's greedy ids on the GPU (graphs on) against the CPU's, here too, with the
   launch mode the backend reports.
4. Full size, for each file: the CUDA logits against the NumPy reference (a 40-token prompt, then
   two single tokens), fp16 and fp32 KV, and again with a few hundred embedding rows split off
   at q8_0 (the same values: `quantize` raises the most used rows so).
5. Full size, for each file: prefill of a 512-token prompt and greedy decode of 128 tokens after
   it, with CUDA graphs on and off (the same ids required), a decode step taken apart (kernel
   time by device events), and batched decode through the scheduler at B = 1, 8, 32 (aggregate
   tok/s); the prompt's prefill with its products on tensor cores and on the fp32 tiles, and their
   logits compared (`tensor_cores`: the backend's choice, and why not where it chose the tiles).
6. `santacpu bench FILE --device cuda --parts speed` on the q4_0 file, if time is left.

Each section is guarded: a failure is written into the summary and the next section runs.
Progress lines go to stdout; everything also goes to the folder given (the device tool's $OUT):
summary.json last (and after every section, so a run cut short still leaves one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(command: list[str], out: Path, name: str, env: dict | None = None, timeout: int = 600) -> int:
    log(f"{name}: {' '.join(command)}")
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=timeout)
    log(f"{name}: exit {done.returncode} after {time.perf_counter() - start:.0f} s")
    tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
    print("\n".join("    " + line for line in tail), flush=True)
    return done.returncode


def build_files(work: Path) -> subprocess.Popen:
    script = (
        f"set -e; santacpu() {{ {sys.executable} -m santacpu \"$@\"; }}; "
        f"[ -f {work}/full-q8_0.safetensors ] && [ -f {work}/full-q4_0.safetensors ] && exit 0; "
        f"santacpu random-checkpoint {work}/full --size full --dtype float16 --force; "
        f"santacpu quantize {work}/full {work}/full-q4_0.safetensors --type q4_0 --calibration none --force & "
        f"santacpu quantize {work}/full {work}/full-q8_0.safetensors --type q8_0 --calibration none --force; wait"
    )
    log("building the full-size random checkpoint and its q4_0 / q8_0 files (background)")
    return subprocess.Popen(["bash", "-c", script], stdout=open(work / "build.log", "w"), stderr=subprocess.STDOUT)


def full_size_logits(path: Path) -> dict:
    """CUDA logits of a full-size file against the NumPy reference, fp16 and fp32 KV."""
    from santacpu.backends.cuda.backend import CudaBackend
    from santacpu.formats.blocks import SYMMETRIC
    from santacpu.loading.quantized import read_quantized
    from santacpu.network import reference
    from santacpu.network.engine import Engine

    weights, _ = read_quantized(path)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, min(49152, weights.config.vocab_size), 42)]
    start = time.perf_counter()
    want = reference.forward(weights, ids)
    reference_s = time.perf_counter() - start
    result = {"reference_s": reference_s}
    variants = [("float16", "float16", weights), ("float32", "float32", weights)]  # (label, KV type, weights)
    if getattr(weights.wte, "qtype", None) in SYMMETRIC:  # the same values, the LM head split as `quantize` splits it
        split = dataclasses.replace(weights, wte=_split_copy(weights.wte, ids))
        variants.append(("float16, split embedding rows", "float16", split))
    for label, kv, variant in variants:
        engine = Engine(variant, CudaBackend(), kv)
        cache = engine.new_cache(len(ids))
        got = np.concatenate([engine.forward(cache, ids[:40], all_logits=True), engine.forward(cache, ids[40:41]),
                              engine.forward(cache, ids[41:42])])
        rows = list(range(40)) + [40, 41]
        error = float(np.abs(got - want[rows]).max() / np.abs(want[rows]).max())
        same_argmax = bool((got.argmax(-1) == want[rows].argmax(-1)).all())
        result[label] = {"relative_error": error, "same_argmax_every_position": same_argmax}
        del engine
    return result


def _split_copy(wte, ids: list[int]):
    """A SplitRowsWeight holding exactly wte's values: a few hundred rows (among them half the
    prompt's tokens) as q8_0, the rest in wte's own format."""
    from santacpu.formats.split_rows import SplitRowsWeight, widened_to_q8_0

    raised = np.union1d(np.asarray(ids[::2]), np.arange(0, wte.shape[0], 211)).astype(np.int32)
    rest = np.setdiff1d(np.arange(wte.shape[0]), raised)
    return SplitRowsWeight(wte.shape, raised, widened_to_q8_0(wte.take_rows(raised)), wte.take_rows(rest))


BUDGET_S = 7 * 60  # the whole run must stay under 8 minutes: optional parts are skipped past this
STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def section(summary: dict, out: Path, name: str, work, optional_after: float | None = None) -> None:
    """summary[name] = work(), or the error; the summary is rewritten after each section."""
    if optional_after is not None and elapsed() > optional_after:
        summary[name] = {"skipped": f"{elapsed():.0f} s elapsed, past {optional_after:.0f} s"}
        log(f"{name}: skipped ({summary[name]['skipped']})")
        return
    log(f"{name}: start ({elapsed():.0f} s elapsed)")
    start = time.perf_counter()
    try:
        summary[name] = work()
    except Exception as error:  # keep going: the other sections still say something
        import traceback

        summary[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    log(f"{name}: done in {time.perf_counter() - start:.1f} s: {json.dumps(summary[name], default=str)[:1500]}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


# Decode's matrices (rows x inputs; fused LayerNorm or epilogue as the model runs them): c_attn,
# attn c_proj, c_fc, mlp c_proj, the LM head.
VARIANT_MATRICES = [("qkv", 2304, 2048, "norm"), ("attn_proj", 2048, 2048, "add"), ("fc", 8192, 2048, "norm+gelu"),
                    ("mlp_proj", 2048, 8192, "add"), ("lm_head", 49280, 2048, "norm")]
MATVEC_ONE_VARIANTS = [(4, 0), (8, 0), (16, 0), (4, 8), (8, 2), (8, 4), (8, 8), (16, 2), (16, 4)]  # (warps, blocks an SM)
MATVEC_CHUNKS_VARIANTS = [(4, 0), (8, 0), (16, 0), (32, 0), (16, 2), (16, 4)]  # (warps, blocks an SM)
FEW_TOKENS = (8, 16)  # matvec_chunks' token counts timed (batched decode B = 8; 16: half of B = 32)
ATTENTION_CASE = {"heads": 16, "head_dim": 128, "layers": 24, "n_ctx": 2048, "starts": (512, 2000)}  # fp16 KV
ROTATED_BYTES = 120_000_000  # each matrix's copies, cycled through: over twice the L2 cache
BUSY_ITERATIONS = 4_000_000  # the busy kernel ahead of each timing: ~10 ms on an H200
ATTENTION_STEP_VARIANTS = [(16, 1), (16, 2), (16, 4), (8, 1), (8, 2), (4, 1), (4, 2), (2, 1), (1, 1)]  # (heads a block, chunks a split)


def _random_weight(qtype: str, rows: int, cols: int, rng):
    """A QuantizedWeight of random codes and small scales (timing only; the values do not matter)."""
    from santacpu.formats.blocks import PART_ORDER, QuantizedWeight

    blocks = cols // 32
    shapes = {"qs": (rows, blocks * (32 if qtype == "q8_0" else 16)), "ql": (rows, blocks * 16), "qh": (rows, blocks * 8)}
    parts = {}
    for name in PART_ORDER[qtype]:
        if name == "d":
            parts[name] = (rng.random((rows, blocks), np.float32) * 0.01 + 0.001).astype(np.float16)
        else:
            parts[name] = rng.integers(0, 256, shapes[name], dtype=np.uint8).view(np.int8 if qtype == "q8_0" else np.uint8)
    return QuantizedWeight(qtype, (rows, cols), parts)


def _device_timer():
    """time(work, n) -> milliseconds a call of work(): n calls between two events, enqueued
    behind a ~20 ms busy kernel so that the host's launch costs leave no gaps between them."""
    from numba import cuda

    @cuda.jit
    def busy(out, n):
        a = out[0]
        for _ in range(n):
            a = a * 0.9999999 + 1e-7
        out[0] = a

    sink = cuda.to_device(np.ones(1, np.float32))
    busy[1, 1](sink, 10)
    cuda.synchronize()

    def time_it(work, n: int, stream) -> float:
        busy[1, 1, stream](sink, BUSY_ITERATIONS)
        start, end = cuda.event(), cuda.event()
        start.record(stream)
        for _ in range(n):
            work()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / n

    return time_it


def kernel_variants(budget_s: float = 60.0) -> dict:
    """Each decode kernel's launch shapes timed on full-size shapes (device events, back to
    back, weights rotated through copies larger than the L2 cache), so that one run tells which
    shapes to make the defaults (backend.MATVEC_ONE, MATVEC_CHUNKS, ATTENTION_STEP): matvec_one
    and matvec_chunks (8 and 16 tokens) for every decode matrix in q4_0 / q8_0 (q6_0 for
    c_attn), attention_step at 512 and 2000 cached positions (fp16 KV). `*_best` is the variant
    with the least modeled step time (24 layers of the four layer matrices, plus the LM head);
    `rel_error` a product against NumPy's (the smaller matrices)."""
    from numba import cuda

    from santacpu.backends.cuda import backend as cb
    from santacpu.backends.cuda.backend import DEVICE_SHAPES, CudaBackend
    from santacpu.network import reference

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    backend = CudaBackend(graphs=False)
    stream = backend._stream
    time_it = _device_timer()
    result: dict = {"current": {"matvec_one": list(cb.MATVEC_ONE), "attention_step": list(cb.ATTENTION_STEP)}}
    widths = {cols for _, _, cols, _ in VARIANT_MATRICES}
    xs = {cols: cuda.to_device(rng.standard_normal((1, cols)).astype(np.float32)) for cols in widths}
    many = {(T, cols): cuda.to_device(rng.standard_normal((T, cols)).astype(np.float32)) for T in FEW_TOKENS for cols in widths}
    lns = {cols: (cuda.to_device(np.ones(cols, np.float32)), cuda.to_device(np.zeros(cols, np.float32)), 1e-5) for cols in widths}
    matvec: dict = {}
    modeled: dict = {}
    matvec_few: dict = {}
    modeled_few: dict = {}
    for qtype in ("q4_0", "q8_0", "q6_0"):
        for name, rows, cols, mode in VARIANT_MATRICES:
            if qtype == "q6_0" and name != "qkv":
                continue
            if time.perf_counter() - started > budget_s * 0.75:
                matvec[f"{qtype} {name}"] = {"skipped": "time"}
                continue
            stored = _random_weight(qtype, rows, cols, rng)
            copies = [backend._matrix(stored) for _ in range(max(2, min(48, -(-ROTATED_BYTES // stored.nbytes))))]
            xin = xs[cols]
            bias = cuda.to_device(np.zeros(rows, np.float32))
            out = cuda.device_array((1, rows), np.float32)
            want = None
            if rows * cols <= 2304 * 2048:  # one product against NumPy (the add epilogue onto zeros)
                dense = stored.dequantize()
                host_x = xin.copy_to_host()
                if "norm" in mode:
                    host_x = (host_x - host_x.mean()) / np.sqrt(host_x.var() + 1e-5)
                want = host_x @ dense.T
                if "gelu" in mode:
                    want = reference.gelu_tanh(want)
            cell: dict = {"MB": round(copies[0].nbytes / 1e6, 2)}
            for variant in MATVEC_ONE_VARIANTS:
                backend.shapes = dataclasses.replace(DEVICE_SHAPES, matvec_one=variant)
                turn = [0]

                def work():
                    w = copies[turn[0] % len(copies)]
                    turn[0] += 1
                    if mode == "add":
                        backend.linear(xin, w, bias, add_to=out)
                    else:
                        backend.linear(xin, w, bias, out=out, gelu="gelu" in mode, norm=lns[cols] if "norm" in mode else None)

                key = f"{variant[0]}x{variant[1]}"
                try:
                    if want is not None:  # correctness first (from zeros for the add epilogue)
                        out.copy_to_device(np.zeros((1, rows), np.float32))
                        turn[0] = 0
                        work()
                        got = out.copy_to_host()
                        error = float(np.abs(got - want).max() / np.abs(want).max())
                    for _ in range(3):
                        work()
                    ms = time_it(work, 20, stream)
                    cell[key] = {"us": round(ms * 1e3, 2), "GB_s": round(copies[0].nbytes / ms / 1e6) if ms > 0 else None}
                    if want is not None:
                        cell[key]["rel_error"] = float(f"{error:.2e}")
                except Exception as error:
                    cell[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
            matvec[f"{qtype} {name}"] = cell
            for T in FEW_TOKENS:  # matvec_chunks (after the LayerNorm launch, in the model: not timed here)
                if time.perf_counter() - started > budget_s * 0.75:
                    break
                few: dict = {}
                xt = many[(T, cols)]
                outs = cuda.device_array((T, rows), np.float32)
                for variant in MATVEC_CHUNKS_VARIANTS:
                    backend.shapes = dataclasses.replace(DEVICE_SHAPES, matvec_chunks=variant)
                    key = f"{variant[0]}x{variant[1]}"
                    turn = [0]

                    def work():
                        w = copies[turn[0] % len(copies)]
                        turn[0] += 1
                        backend.linear(xt, w, bias, out=outs, gelu="gelu" in mode)

                    try:
                        if want is not None and mode == "add":  # no epilogue (onto nothing): x @ W.T
                            turn[0] = 0
                            work()
                            wanted = xt.copy_to_host() @ dense.T
                            few_error = float(np.abs(outs.copy_to_host() - wanted).max() / np.abs(wanted).max())
                        for _ in range(3):
                            work()
                        ms = time_it(work, 20, stream)
                        few[key] = {"us": round(ms * 1e3, 2), "GB_s": round(copies[0].nbytes / ms / 1e6) if ms > 0 else None}
                        if want is not None and mode == "add":
                            few[key]["rel_error"] = float(f"{few_error:.2e}")
                    except Exception as error:
                        few[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
                matvec_few[f"{qtype} {name} T={T}"] = few
                for key, value in few.items():
                    if "us" in value:
                        modeled_few.setdefault(f"{qtype} T={T}", {}).setdefault(key, 0.0)
                        modeled_few[f"{qtype} T={T}"][key] += (1 if name == "lm_head" else 24) * value["us"]
            weight = 1 if name == "lm_head" else 24
            for key, value in cell.items():
                if isinstance(value, dict) and "us" in value:
                    modeled.setdefault(qtype, {}).setdefault(key, 0.0)
                    modeled[qtype][key] += weight * value["us"]
    result["matvec_one"] = matvec
    result["matvec_one_modeled_step_us"] = {q: {k: round(v) for k, v in m.items()} for q, m in modeled.items()}
    result["matvec_one_best"] = {q: min(m, key=m.get) for q, m in modeled.items() if m}
    result["matvec_chunks"] = matvec_few
    result["matvec_chunks_modeled_step_us"] = {q: {k: round(v) for k, v in m.items()} for q, m in modeled_few.items()}
    result["matvec_chunks_best"] = {q: min(m, key=m.get) for q, m in modeled_few.items() if m}
    result["current"]["matvec_chunks"] = list(cb.MATVEC_CHUNKS)
    backend.shapes = DEVICE_SHAPES

    attention: dict = {}
    H, D, L, n_ctx = (ATTENTION_CASE[k] for k in ("heads", "head_dim", "layers", "n_ctx"))
    k_cache = backend.new_kv((L, n_ctx, 1, D), np.float16)
    v_cache = backend.new_kv((L, n_ctx, 1, D), np.float16)
    k_cache.copy_to_device(rng.standard_normal((L, n_ctx, 1, D)).astype(np.float16).view(np.uint16))
    v_cache.copy_to_device(rng.standard_normal((L, n_ctx, 1, D)).astype(np.float16).view(np.uint16))
    qkv = cuda.to_device(rng.standard_normal((1, H * D + 2 * D)).astype(np.float32))
    out = cuda.device_array((1, H * D), np.float32)
    for start in ATTENTION_CASE["starts"]:
        # the position on the device, where attend finds it (as after input_embeddings): no copy a launch
        backend._positions = (np.array([start], np.int64), cuda.to_device(np.array([start], np.int64)))
        if time.perf_counter() - started > budget_s:
            attention[str(start)] = {"skipped": "time"}
            continue
        cell = {}
        for variant in ATTENTION_STEP_VARIANTS:
            backend.shapes = dataclasses.replace(DEVICE_SHAPES, attention_step=variant)
            layer = [0]

            def work():
                backend.attend(qkv, k_cache, v_cache, layer[0] % L, start, out)
                layer[0] += 1

            key = f"{variant[0]}x{variant[1]}"
            try:
                for _ in range(3):
                    work()
                cell[key] = {"us": round(time_it(work, 24, stream) * 1e3, 2)}
            except Exception as error:
                cell[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
        attention[str(start)] = cell
    first = str(ATTENTION_CASE["starts"][0])
    timed = {k: v["us"] for k, v in attention.get(first, {}).items() if isinstance(v, dict) and "us" in v}
    result["attention_step"] = attention
    result[f"attention_step_best_{first}"] = min(timed, key=timed.get) if timed else None
    backend.shapes = DEVICE_SHAPES
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def trained_fixture_greedy() -> dict:
    """The trained fixture's greedy ids on the GPU (graphs on, then off) against the CPU's."""
    import santacpu

    folder = REPO / "tests" / "fixtures" / "trained_tiny"
    prompt = "def fibonacci(n):\n"
    # The CPU's float kernels take x as it is, as the GPU's do: its integer kernels round x per
    # block (on VNNI CPUs q8_0's layer matrices to int8), which can move a greedy choice.
    with mock.patch.dict(os.environ, {"SANTACPU_INT_DOT": "0"}):  # read by load()
        cpu = santacpu.load(folder, device="cpu")
    want = list(cpu.generate(cpu.tokenizer.encode(prompt), max_new_tokens=48, lookup=False))
    gpu = santacpu.load(folder, device="cuda")
    backend = gpu.engine.backend
    result = {}
    for graphs in (True, False):
        backend.use_graphs = graphs
        got = list(gpu.generate(gpu.tokenizer.encode(prompt), max_new_tokens=48, lookup=False))
        result[f"graphs_{'on' if graphs else 'off'}_equal_cpu"] = got == want
    backend.use_graphs = True
    result["tokens"] = len(want)
    result["launch_mode"] = backend.launch_mode
    result["graph_counts"] = backend.graph_counts
    result["device"] = gpu.device
    return result


def _greedy_run(engine, prompt: list[int], n_new: int, graphs: bool) -> dict:
    """Prefill `prompt`, then `n_new` greedy tokens, timed (the device synchronised at both ends:
    every forward returns host logits)."""
    backend = engine.backend
    backend.use_graphs = graphs
    cache = engine.new_cache(len(prompt) + n_new + 1)
    before = dict(backend.graph_counts)
    start = time.perf_counter()
    logits = engine.forward(cache, prompt)[-1]
    prefill_s = time.perf_counter() - start
    ids = []
    start = time.perf_counter()
    for _ in range(n_new):
        ids.append(int(np.argmax(logits)))
        logits = engine.forward(cache, [ids[-1]])[-1]
    decode_s = time.perf_counter() - start
    counts = {k: backend.graph_counts[k] - before[k] for k in ("captures", "replays", "plain_steps")}
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": n_new / decode_s, "step_ms": 1e3 * decode_s / n_new,
            "ids": ids, "mode": backend.launch_mode, **counts}


def _by_kernel(timings: list) -> dict:
    """backend.profile's (label, bytes, ms) summed by kernel (a label's first word)."""
    kernels: dict = {}
    for label, _, ms in timings:
        k = kernels.setdefault(label.split(" ")[0], [0, 0.0])
        k[0] += 1
        k[1] += ms
    return {name: {"launches": n, "ms": round(ms, 4)} for name, (n, ms) in kernels.items()}


def _tensor_core_prefill(engine, prompt: list[int]) -> dict:
    """The prompt's prefill with its block-format products on tensor cores and on the fp32 tiles
    (three times each, alternating: the first fp32 run compiles the tiles for these shapes):
    tok/s, the last position's logits of the two compared, and one prefill on tensor cores taken
    apart by kernel."""
    backend = engine.backend
    result: dict = {"chosen": backend.tensor_cores, "reason": backend.tensor_core_reason}
    if not backend.tensor_cores:
        return result
    rates: dict = {"on": [], "off": []}
    logits: dict = {}
    try:
        for on in (False, True, False, True, False, True):
            backend.tensor_cores = on
            cache = engine.new_cache(len(prompt) + 1)
            start = time.perf_counter()
            logits[on] = engine.forward(cache, prompt)[-1]
            rates["on" if on else "off"].append(round(len(prompt) / (time.perf_counter() - start), 1))
    finally:
        backend.tensor_cores = True
    result["prefill_tok_s"] = rates
    result["logits_rel_diff"] = float(np.abs(logits[True] - logits[False]).max() / np.abs(logits[False]).max())
    result["same_argmax"] = int(np.argmax(logits[True])) == int(np.argmax(logits[False]))
    # the prefill on tensor cores taken apart by kernel (device events, launches one by one)
    result["prefill_profile"] = _by_kernel(backend.profile(lambda: engine.forward(engine.new_cache(len(prompt) + 1), prompt)))
    return result


def speed(path: Path, prompt_tokens: int = 512, n_new: int = 128, batch: tuple = (1, 8, 32), warm_tokens: int = 64,
          batch_prompt: int = 256, batch_new: int = 64) -> dict:
    """Prefill and decode at a 512-token context with graphs on and off (each twice, after a
    warm-up of both), a decode step taken apart, batched decode at B = 1, 8, 32."""
    import santacpu

    model = santacpu.load(path, device="cuda")
    engine, backend = model.engine, model.engine.backend
    rng = np.random.default_rng(1)
    prompt = [int(i) for i in rng.integers(0, model.config.vocab_size, prompt_tokens)]
    result: dict = {"device": model.device}
    for graphs in (True, False):  # warm-up: compiles, prepares launches, one capture
        _greedy_run(engine, prompt[:warm_tokens], 8, graphs)
    runs = {"on": [], "off": []}
    for _ in range(2):
        for graphs in (False, True):
            run = _greedy_run(engine, prompt, n_new, graphs)
            runs["on" if graphs else "off"].append(run)
            log(f"  graphs {'on' if graphs else 'off'}: prefill {run['prefill_tok_s']:.0f} tok/s, decode "
                f"{run['decode_tok_s']:.1f} tok/s ({run['step_ms']:.2f} ms a step; {run['mode']}, "
                f"{run['captures']} captures, {run['replays']} replays, {run['plain_steps']} plain steps)")
    for label, done in runs.items():
        result[f"graphs_{label}"] = {
            "decode_tok_s": [r["decode_tok_s"] for r in done], "step_ms": [r["step_ms"] for r in done],
            "prefill_tok_s": [r["prefill_tok_s"] for r in done], "mode": done[-1]["mode"],
            "captures": [r["captures"] for r in done], "replays": [r["replays"] for r in done],
        }
    ids = [r["ids"] for done in runs.values() for r in done]
    result["greedy_ids_equal_graphs_on_off"] = all(i == ids[0] for i in ids)
    result["first_ids"] = ids[0][:16]
    backend.use_graphs = True
    result["launch_mode"], result["graph_reason"] = backend.launch_mode, backend.graph_reason
    try:  # guarded: the sections after it in this one (step profile, batched decode) still run
        result["tensor_cores"] = _tensor_core_prefill(engine, prompt)
    except Exception as error:
        result["tensor_cores"] = {"error": f"{type(error).__name__}: {error}"}
    log(f"  prompts on tensor cores: {result['tensor_cores']}")

    # one decode step at the prompt's end taken apart (device events: launches one by one)
    cache = engine.new_cache(len(prompt) + 1)
    engine.forward(cache, prompt)
    timings = backend.profile(lambda: engine.forward(cache, [prompt[0]]))
    result["step_profile"] = {"launches": len(timings), "kernel_ms": sum(ms for _, _, ms in timings), "by_kernel": _by_kernel(timings)}
    log(f"  decode step: {len(timings)} launches, {result['step_profile']['kernel_ms']:.3f} ms of kernels")

    result["batched"] = {}
    for B in batch:
        if elapsed() > BUDGET_S - 60:
            result["batched"][str(B)] = {"skipped": f"{elapsed():.0f} s elapsed"}
            continue
        try:
            result["batched"][str(B)] = _batched(model, B, batch_prompt, batch_new)
            log(f"  batched B={B}: {result['batched'][str(B)]}")
        except Exception as error:
            result["batched"][str(B)] = {"error": f"{type(error).__name__}: {error}"}
    result["graph_counts"] = backend.graph_counts
    result["device_after"] = model.device
    return result


def _batched(model, B: int, prompt_tokens: int = 256, n_new: int = 64) -> dict:
    """B sequences through the scheduler: prompts joined in the first step, later steps timed."""
    rng = np.random.default_rng(B)
    scheduler = model.scheduler(max_batch=B)
    for _ in range(B):
        scheduler.submit([int(i) for i in rng.integers(0, model.config.vocab_size, prompt_tokens)], max_new_tokens=n_new,
                         lookup=False)
    start = time.perf_counter()
    scheduler.step()
    joined = time.perf_counter()
    tokens = steps = 0
    while scheduler.pending:
        tokens += sum(len(emitted) for _, emitted in scheduler.step())
        steps += 1
    elapsed_s = time.perf_counter() - joined
    return {"aggregate_tok_s": round(tokens / elapsed_s, 1), "per_sequence_tok_s": round(tokens / elapsed_s / B, 1),
            "step_ms": round(1e3 * elapsed_s / max(steps, 1), 2), "tokens": tokens, "prompts_s": round(joined - start, 2)}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    work = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    try:
        from numba import cuda

        gpu = cuda.get_current_device()
        summary["gpu"] = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
        import numba

        summary["versions"] = {"python": sys.version.split()[0], "numba": numba.__version__, "numpy": np.__version__}
        import importlib.metadata as md

        for package in ("numba-cuda", "cuda-bindings", "cuda-python", "cuda-core"):
            try:
                summary["versions"][package] = md.version(package)
            except Exception:
                pass
    except Exception as error:
        summary["gpu"] = f"error: {error!r}"
    log(f"GPU {summary.get('gpu')}; {summary.get('versions')}")

    builder = build_files(work)
    section(summary, out, "kernel_variants", kernel_variants)
    env = {"NUMBA_ENABLE_CUDASIM": "0", "SANTACPU_INT_DOT": "0", "PYTHONPATH": str(REPO)}
    section(summary, out, "tests", lambda: run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py", "tests/test_cuda_graphs.py", "-rs", "--durations=8"],
        out, "tests", env, timeout=240))
    section(summary, out, "trained_fixture_greedy", trained_fixture_greedy)
    try:
        builder.wait(timeout=max(10, BUDGET_S - 120 - elapsed()))
    except subprocess.TimeoutExpired:
        log("the full-size files are not built in time")
    log(f"files built: exit {builder.returncode}")
    print((work / "build.log").read_text(errors="replace")[-1500:], flush=True)
    for qtype in ("q4_0", "q8_0"):
        path = work / f"full-{qtype}.safetensors"
        if not path.exists():
            summary[f"speed_{qtype}"] = {"error": f"{path} was not built"}
            continue
        section(summary, out, f"speed_{qtype}", lambda: speed(path), optional_after=BUDGET_S - 90)
    for qtype in ("q4_0", "q8_0"):
        path = work / f"full-{qtype}.safetensors"
        if path.exists():
            section(summary, out, f"logits_{qtype}", lambda: full_size_logits(path), optional_after=BUDGET_S - 60)
    path = work / "full-q4_0.safetensors"
    if path.exists():
        section(summary, out, "bench_q4_0", lambda: run(
            [sys.executable, "-m", "santacpu", "bench", str(path), "--device", "cuda", "--parts", "speed",
             "--fim-tokens", "0", "--repeat", "1", "--json", str(out / "bench-q4_0.json")],
            out, "bench-q4_0", env, timeout=max(30, int(BUDGET_S + 30 - elapsed()))), optional_after=BUDGET_S - 75)
    summary["elapsed_s"] = round(elapsed())
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str)[:20000])
    return 0


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # no parser: print what it does, before it writes or runs anything
        sys.exit(print(__doc__.strip()))
    sys.exit(main())
