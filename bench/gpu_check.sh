#!/usr/bin/env bash
# On a machine with a CUDA GPU: the engine's and the memory profiles' tests on the device, then
# the real-size benchmark (docs/performance.md, section f). Figures go to $OUT (default: ./gpu-figures).
# PROFILES narrows the benchmark (default: every profile bench/gpu.py measures).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-figures}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
QIE_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_memory_profiles.py tests/test_diffusers_engine.py \
  2>&1 | tee "$OUT/tests.txt"
cd bench
"$PYTHON" gpu.py --size real --device cuda --drop-caches ${PROFILES:+--profiles "$PROFILES"} \
  --json "../$OUT/gpu.json" 2>&1 | tee "../$OUT/bench.txt"
