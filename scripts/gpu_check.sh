#!/usr/bin/env bash
# The GPU check, one prepared script for a machine with one NVIDIA GPU (under 8 minutes):
#   1. the `cuda`-marked tests (tests/unit/runtime/test_cuda.py: placement, CUDA kernels vs the
#      generic math, greedy tokens per backend, compiled decode = eager, a cache that cannot fit);
#   2. bench/gpu.py: bf16 / int8 (both CUDA kernels) / int4 decode at batch 1 and 8 on the R1-1.5B
#      shape and the real 0.5B (when models/qwen2.5-0.5b-st is present), transformers generate bf16,
#      and the bandwidth bound from the measured device copy bandwidth -> JSON.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default bench/results; PYTHON overrides the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
"$PY" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}); run this on a GPU machine")
print(f"gpu_check: {torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}, "
      f"torch {torch.__version__}", flush=True)
PY
status=0
# 1. the cuda tests (~2 min): their report beside the bench JSON
timeout 180 "$PY" -m pytest -q -m cuda tests/unit/runtime/test_cuda.py -rs \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" || status=1
# 2. the bench (~4-5 min): rows written as measured, so a timeout keeps what was done
timeout 330 "$PY" -m bench.gpu --out "$OUT/gpu.json" --budget_s 270 || status=1
echo "gpu_check: tests $OUT/gpu_tests.log, bench $OUT/gpu.json (status $status)"
exit $status
