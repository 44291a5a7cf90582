#!/usr/bin/env bash
# `make demo`: prepare the King James Bible, train a small SamOut for a few minutes on
# CPU, print its validation bits per byte and a sample. Settings via environment:
#   DEMO_TIME (training budget, default 240s), DEMO_STEPS, DEMO_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data/kjv-4096
RUN=runs/demo
export OMP_NUM_THREADS="${DEMO_THREADS:-2}"

if [ ! -f "$DATA/meta.json" ]; then
  "$BIN/samout" prepare kjv --out "$DATA" --vocab-size 4096
fi
rm -rf "$RUN"
"$BIN/samout" train --data "$DATA" --out "$RUN" --preset small \
  --seq-len 128 --batch-size 16 --lr 3e-3 --warmup-steps 20 \
  --max-steps "${DEMO_STEPS:-5000}" --max-time "${DEMO_TIME:-240s}" \
  --eval-every 50 --eval-windows 16 --save-every 100 --log-every 5 --seed 0
echo
echo "== validation (all of it) =="
"$BIN/samout" eval "$RUN" --quiet | head -2
echo
echo "== sample =="
"$BIN/samout" generate "$RUN" --prompt "And the LORD said unto Moses," --max-new-tokens 80 \
  --temperature 0.8 --top-k 40 --seed 0
