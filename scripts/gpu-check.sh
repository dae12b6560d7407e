#!/usr/bin/env bash
# The checks that need a CUDA GPU (issue 13): real-size random checkpoints, the paired bench for every
# precision and quantization, the static-cache path, parking and GPU memory after switches; within
# 8 minutes; one JSON and one Markdown report (gpu-check/ by default). No network needed.
#   bash scripts/gpu-check.sh                 on a machine with one CUDA GPU
#   bash scripts/gpu-check.sh --reduced       tiny sizes, on the CPU when there is no GPU (the tests run this)
#   bash scripts/gpu-check.sh --out DIR --root DIR
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BLIP_APP_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m blip_app.devtools.gpucheck "$@"
