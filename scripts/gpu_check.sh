#!/usr/bin/env bash
# Every figure a GPU session owes, in one run: under 8 minutes on one H100.
#
#   scripts/gpu_check.sh            on a CUDA machine: the device tests, then
#                                   `python -m samout.bench.gpu_check` (kernels against the
#                                   reference on the GPU, chunked == full, Triton against
#                                   fused, SDPA; training tokens/s of SamOut, the hybrids and
#                                   the modern baseline at 1k/4k/16k tokens; 85M decode
#                                   tokens/s at batch 1 and 64 against the author's 1,241
#                                   tokens/s on an RTX 4090)
#   scripts/gpu_check.sh --smoke    tiny sizes, no test run (what tests/bench/test_gpu_check.py
#   SMOKE=1 scripts/gpu_check.sh    runs); without CUDA the script runs this way by itself
#   scripts/gpu_check.sh --cpu      the CPU even where CUDA is (implies --smoke)
#
# Settings via environment: PYTHON (default .venv/bin/python, else python3), OUT (where
# gpu_check.json and the test log go; default bench-results/gpu-check), TEST_TIMEOUT
# (seconds for the test part, default 180). Exit status: non-zero if a test or a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-bench-results/gpu-check}"
SMOKE="${SMOKE:-0}"
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --cpu) SMOKE=1; ARGS+=(--cpu) ;;
    *) echo "usage: $0 [--smoke] [--cpu]" >&2; exit 2 ;;
  esac
done
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  SMOKE=1
fi
[ "$SMOKE" = 1 ] && ARGS+=(--smoke)
mkdir -p "$OUT"
status=0
start=$(date +%s)

if [ "$SMOKE" != 1 ]; then
  echo "== device tests (kernels against the reference, chunked == full, Triton, the KV cache) =="
  "$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'
  timeout "${TEST_TIMEOUT:-180}" "$PYTHON" -m pytest -q -p no:cacheprovider -x \
    tests/ops/test_running_max.py tests/ops/test_maxstate_mix.py tests/ops/test_triton.py \
    tests/layers tests/models/test_transformer.py >"$OUT/tests.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/tests.log"
  [ $rc -ne 0 ] && { echo "device tests FAILED (exit $rc; $OUT/tests.log)"; status=1; }
fi

echo "== checks and figures (python -m samout.bench.gpu_check ${ARGS[*]}) =="
"$PYTHON" -m samout.bench.gpu_check --out "$OUT" "${ARGS[@]}" || status=1
echo "gpu_check: $(( $(date +%s) - start ))s, exit $status"
exit $status
