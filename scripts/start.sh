#!/usr/bin/env bash
# Set up (first run) and start the app. Extra arguments go to app.py, e.g.
#   bash scripts/start.sh --model blip2-opt-2.7b --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${BLIP_APP_VENV:-.venv}/bin/python" app.py "$@"
