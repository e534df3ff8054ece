#!/usr/bin/env bash
# The day a GPU is lent (issue 31): every GPU check in one offline run, <= 8 minutes on one H100.
#
#   bash scripts/gpu_check.sh OUT_DIR [--dry-run] [--only a,b] [--skip a,b] [--budget-s 470]
#       -> OUT_DIR/summary.md, summary.json, one JSON per stage, logs/
#   bash scripts/gpu_check.sh --prepare [--python-version 3.12]
#       here, online, once before the device call: fills .gpu_carry/ (wheels, tokenizer, calibration corpus)
#
# The device call: command `bash scripts/gpu_check.sh $OUT`, carry [".gpu_carry"].
# Python: $GSQ_PYTHON, else the project's .venv for --prepare and the image's python3 (with torch) otherwise.
# Stages and time boxes: scripts/gpu_check.py.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--prepare" ]; then
  PY="${GSQ_PYTHON:-$ROOT/.venv/bin/python}"
  exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
fi
PY="${GSQ_PYTHON:-}"
if [ -z "$PY" ]; then  # the image's Python: the first of python3, python that has torch
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then PY="$(command -v "$c")"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check.sh: no python3/python with torch on PATH (set GSQ_PYTHON)" >&2
  exit 2
fi
# A hard stop past the run's own budget, inside the device call's 10-minute limit.
if command -v timeout >/dev/null 2>&1; then
  exec timeout -k 10 560 "$PY" "$ROOT/scripts/gpu_check.py" "$@"
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
