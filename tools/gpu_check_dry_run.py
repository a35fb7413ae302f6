"""tools/gpu_check.py's sections run under the CUDA simulator, without a GPU: a check of the
script's own code (names, arguments, what each section reads from the backend) before GPU time
is spent on it, not of the kernels (the CUDA tests and tools/ptx_check.py check those).

A random model of a 64-token vocabulary and 64 positions (the simulator runs ~20 us a multiply-add:
the real vocabulary's LM head would take minutes a step) is written and quantized to q4_0 and q8_0
in a temporary folder; then, at small sizes:
- `speed`: prefill and decode with graphs on and off, the step profile, batched B = 1, 2;
- `_tensor_core_prefill`: forced on (the simulator runs the fp32 tiles unless asked) with a prompt
  longer than a decode step, so the prompt products go to the tensor-core kernels' Python twins;
- `full_size_logits` on the q8_0 file;
- with `--variants`, `kernel_variants` on small shapes, two launch shapes each (~8 minutes more).
`trained_fixture_greedy` is left out (its real vocabulary); the CUDA tests make the same comparison.

    python -m tools.gpu_check_dry_run [--variants]     # ~5 minutes on 2 cores; exit 1 if a section failed
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from santacpu.loading import random_checkpoint  # noqa: E402
from tools import gpu_check  # noqa: E402

SMALL_MATRICES = [("qkv", 96, 64, "norm"), ("attn_proj", 64, 64, "add"), ("fc", 256, 64, "norm+gelu"),
                  ("mlp_proj", 64, 256, "add"), ("lm_head", 128, 64, "norm")]


def small_files(folder: Path) -> dict[str, Path]:
    """The dry run's model: the simulator's "sim" shapes with 64 positions, quantized to q4_0 and q8_0."""
    random_checkpoint.SIZES["dry_run"] = dict(random_checkpoint.SIZES["sim"], n_positions=64)
    random_checkpoint.write_checkpoint(folder / "sim", size="dry_run", with_tokenizer=True)
    files = {}
    for qtype in ("q4_0", "q8_0"):
        files[qtype] = folder / f"sim-{qtype}.safetensors"
        subprocess.run([sys.executable, "-m", "santacpu", "quantize", str(folder / "sim"), str(files[qtype]), "--type", qtype,
                        "--calibration", "none"], check=True, capture_output=True)
    return files


def tensor_core_prefill(path: Path) -> dict:
    import santacpu

    model = santacpu.load(path, device="cuda")
    model.engine.backend.tensor_cores = True
    result = gpu_check._tensor_core_prefill(model.engine, [int(i) % model.config.vocab_size for i in range(1, 41)])
    if "matmul_tc" not in result.get("prefill_profile", {}):
        raise AssertionError(f"the prompt's products did not reach matmul_tc: {result}")
    return result


def kernel_variants() -> dict:
    gpu_check.VARIANT_MATRICES = SMALL_MATRICES
    gpu_check.MATVEC_ONE_VARIANTS = gpu_check.MATVEC_ONE_VARIANTS[:2]
    gpu_check.MATVEC_CHUNKS_VARIANTS = gpu_check.MATVEC_CHUNKS_VARIANTS[:2]
    gpu_check.ATTENTION_STEP_VARIANTS = gpu_check.ATTENTION_STEP_VARIANTS[:2]
    gpu_check.FEW_TOKENS = (3,)
    gpu_check.ATTENTION_CASE = {"heads": 4, "head_dim": 16, "layers": 2, "n_ctx": 64, "starts": (10, 40)}
    gpu_check.ROTATED_BYTES, gpu_check.BUSY_ITERATIONS = 10_000, 10
    return gpu_check.kernel_variants(budget_s=3600)


def main(arguments: list[str]) -> int:
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="santacpu-gpu-dry-run-") as folder:
        files = small_files(Path(folder))
        sections = [
            ("speed", lambda: gpu_check.speed(files["q4_0"], prompt_tokens=40, n_new=4, batch=(1, 2), warm_tokens=8,
                                              batch_prompt=8, batch_new=3)),
            ("tensor_cores", lambda: tensor_core_prefill(files["q4_0"])),
            ("logits", lambda: gpu_check.full_size_logits(files["q8_0"])),
        ]
        if "--variants" in arguments:
            sections.append(("kernel_variants", kernel_variants))
        out = Path(folder) / "out"
        out.mkdir()
        for name, work in sections:
            started = time.perf_counter()
            gpu_check.section(summary, out, name, work)
            gpu_check.log(f"dry run: {name} in {time.perf_counter() - started:.0f} s")
    failed = [name for name, result in summary.items() if isinstance(result, dict) and "error" in result]
    print(json.dumps({"failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # no parser: print what it does, before it writes or runs anything
        sys.exit(print(__doc__.strip()))
    sys.exit(main(sys.argv[1:]))
