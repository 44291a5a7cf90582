#!/usr/bin/env bash
# The chat demo: pretrain (or reuse) a small SamOut, SFT, GRPO and DPO, with a table of exact-match
# accuracy, end-of-turn rate and preference accuracy after each stage, and GRPO's reward curve.
# Knobs: CHAT_DEMO_DIR (build/chat-demo), CHAT_DEMO_FLAGS (e.g. "--sft-time 3m").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m samout.chat.demo --out "${CHAT_DEMO_DIR:-build/chat-demo}" ${CHAT_DEMO_FLAGS:-}
