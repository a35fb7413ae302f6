"""The CUDA backend's checks on a real GPU, in one run (tools/gpu_check.sh calls it; see there).

1. Starts building the full-size random checkpoint and its q8_0 / q4_0 files (in the background).
2. Runs tests/test_cuda.py on the GPU (NUMBA_ENABLE_CUDASIM=0): every kernel against its NumPy
   twin with the GPU's launch shapes, the sim model, the golden fixtures (fp32 KV within 1e-4,
   fp16 within 1e-3) and the trained fixture's greedy text against the CPU's.
3. Full size: the CUDA logits of each file against the NumPy reference (a 40-token prompt, then
   two single tokens), fp16 and fp32 KV, and again with a few hundred embedding rows split off
   at q8_0 (the same values: `quantize` raises the most used rows so). (The greedy comparison is
   the trained fixture's, in 2.)
4. `santacpu bench FILE --device cuda --parts speed` for each file: prefill 512, decode 128,
   the decode step taken apart (kernels against launch overhead), device memory, copy bandwidth.

Prints a short summary last; everything also goes to the folder given (the device tool's $OUT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 49152, 42)]
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


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    work = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    from numba import cuda

    gpu = cuda.get_current_device()
    summary["gpu"] = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
    import numba

    summary["versions"] = {"python": sys.version.split()[0], "numba": numba.__version__, "numpy": np.__version__}
    try:
        import importlib.metadata as md

        summary["versions"]["numba-cuda"] = md.version("numba-cuda")
    except Exception:
        pass
    log(f"GPU {summary['gpu']}; {summary['versions']}")

    builder = build_files(work)
    env = {"NUMBA_ENABLE_CUDASIM": "0", "SANTACPU_INT_DOT": "0", "PYTHONPATH": str(REPO)}
    summary["tests_exit"] = run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py", "-rs", "--durations=8"],
                                out, "tests", env)
    builder.wait()
    log(f"files built: exit {builder.returncode}")
    print((work / "build.log").read_text(errors="replace")[-1500:], flush=True)
    for qtype in ("q4_0", "q8_0"):
        path = work / f"full-{qtype}.safetensors"
        if not path.exists():
            continue
        try:
            summary[f"logits_{qtype}"] = full_size_logits(path)
        except Exception as error:  # keep going: the bench below still says something
            summary[f"logits_{qtype}"] = {"error": repr(error)}
        log(f"{qtype} logits: {summary[f'logits_{qtype}']}")
        bench_json = out / f"bench-{qtype}.json"
        summary[f"bench_{qtype}_exit"] = run(
            [sys.executable, "-m", "santacpu", "bench", str(path), "--device", "cuda", "--parts", "speed",
             "--fim-tokens", "0", "--repeat", "3", "--json", str(bench_json)],
            out, f"bench-{qtype}", env,
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
