#!/usr/bin/env bash
# The GPU check, one prepared script for a machine with one NVIDIA GPU (under 7 minutes):
#   0. the machine's facts (GPU, driver, torch / transformers versions) -> env.txt;
#   1. the `cuda`-marked tests (tests/unit/runtime/test_cuda.py: placement, CUDA kernels vs the
#      generic math, greedy tokens per backend, compiled decode = eager, a cache that cannot fit),
#      while the 1.5B-shape model is written on the CPU beside them (it is bench.gpu's input);
#   2. bench/gpu.py: bf16 / int8 (both CUDA kernels) / int4 decode at batch 1 and 8 on the R1-1.5B
#      shape and the real 0.5B (when models/qwen2.5-0.5b-st is present), transformers generate bf16,
#      and the bandwidth bound from the measured device copy bandwidth -> JSON.
# Usage: scripts/gpu_check.sh [OUT_DIR] [BENCH_BUDGET_S]   (defaults bench/results, 190;
#        PYTHON overrides the interpreter: on a GPU machine the image's python3 holds its CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
BUDGET="${2:-190}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
# the neutral package and the operator's sources are importable as in the repo's venv (installed there)
export PYTHONPATH=".:contract:operator${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}); run this on a GPU machine")
import transformers
print(f"gpu_check: {torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"python {platform.python_version()}", flush=True)
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
status=0
# the bench's model, written on the CPU while the tests use the GPU (bench.gpu finds it done)
"$PY" -c "from bench.gpu import TOKENIZER_DIR, REPO; from bench.models import make_r1_shaped_model as m; \
print(m(REPO / 'models' / 'r1-distill-qwen-1.5b-shape-random', TOKENIZER_DIR))" >"$OUT/model.log" 2>&1 &
writer=$!
# 1. the cuda tests (~2 min): their report beside the bench JSON
timeout 150 "$PY" -m pytest -q -m cuda tests/unit/runtime/test_cuda.py -rs \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" || status=1
wait "$writer" || { echo "gpu_check: writing the 1.5B-shape model failed:"; cat "$OUT/model.log"; status=1; }
# 2. the bench: rows written as measured, so a timeout keeps what was done (+60 s: the row in flight)
timeout $((BUDGET + 60)) "$PY" -m bench.gpu --out "$OUT/gpu.json" --budget_s "$BUDGET" || status=1
echo "gpu_check: tests $OUT/gpu_tests.log, bench $OUT/gpu.json (status $status)"
exit $status
