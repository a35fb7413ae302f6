#!/usr/bin/env bash
# The CUDA backend's checks on a real GPU, in one call: tests/test_cuda.py without the simulator,
# a full-size random checkpoint's q4_0 / q8_0 files checked against the NumPy reference, and
# `santacpu bench --device cuda` on each (see tools/gpu_check.py). Runs from the repository root
# with the machine's own Python packages (numpy, numba, numba-cuda, safetensors, tokenizers,
# typer, huggingface_hub, pytest): nothing is installed. Output: the folder $OUT (or ./gpu_check_out).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
python3 tools/gpu_check.py "$out" /tmp/gpu_check 2>&1 | tee "$out/gpu_check.log"
