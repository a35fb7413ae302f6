#!/usr/bin/env bash
# The CUDA backend's checks on a real GPU, in one call (under 8 minutes): tests/test_cuda.py and
# tests/test_cuda_graphs.py without the simulator, the trained fixture's greedy ids against the
# CPU's, a full-size random checkpoint's q4_0 / q8_0 files: prefill and decode speed at a
# 512-token context with CUDA graphs on and off, batched decode at B = 1, 8, 32, logits against
# the NumPy reference, and `santacpu bench --device cuda` (see tools/gpu_check.py). Runs from the repository root
# with the machine's own Python packages (numpy, numba, numba-cuda, safetensors, tokenizers,
# typer, huggingface_hub, pytest): nothing is installed. Output: the folder $OUT (or ./gpu_check_out).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
# gpu_check.py keeps its own budget (7 minutes); this bound is the last resort (summary.json is
# rewritten after every section, so a run cut short still leaves what it measured).
timeout -k 10 470 python3 tools/gpu_check.py "$out" /tmp/gpu_check 2>&1 | tee "$out/gpu_check.log"
