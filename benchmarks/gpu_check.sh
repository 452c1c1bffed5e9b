#!/usr/bin/env bash
# The prepared GPU check from the repository root: CUDA tests, engine and batched-client timings on
# randomly initialised model shapes, aggregators at n=100, d=16.8M; then merges the figures into
# benchmarks/results.md. Needs a Python with torch (CUDA), transformers, peft and pytest; no downloads.
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (<= 8 minutes)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: tiny sizes on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
rc=0
"$PY" benchmarks/gpu_check.py --json benchmarks/out/gpu_check.json --md benchmarks/out/gpu_check.md "$@" || rc=$?
if [ "$rc" -ne 2 ] && [[ " $* " != *" --dry-run "* ]] && [ -f benchmarks/out/gpu_check.json ]; then
  "$PY" benchmarks/run_all.py --merge gpu=benchmarks/out/gpu_check.json
fi
exit "$rc"
