#!/usr/bin/env bash
# Set up (first run, with the test tools and chromium) and run the whole test suite offline.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k engine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 GRADIO_ANALYTICS_ENABLED=False
# The layers import one way (pyproject.toml [tool.importlinter]); then the tests.
"${BLIP_APP_VENV:-.venv}/bin/lint-imports" --no-cache
exec "${BLIP_APP_VENV:-.venv}/bin/python" -m pytest "$@"
