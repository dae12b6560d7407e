#!/usr/bin/env bash
# Create .venv and install what blip_app needs. Idempotent: a second run only checks.
#   bash scripts/setup.sh          the app's packages (requirements.txt)
#   bash scripts/setup.sh --dev    also the test tools (requirements-dev.txt), Ray Serve (requirements-ray.txt,
#                                  optional for users, tested in CI) and Debian's chromium
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${BLIP_APP_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

want="requirements.txt"
[ "${1:-}" = "--dev" ] && want="requirements.txt requirements-dev.txt requirements-ray.txt"
stamp="$VENV/.installed-$(cat $want | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing $want (torch is large: the first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  args=()
  for file in $want; do args+=(-r "$file"); done
  "$VENV/bin/python" -m pip install --quiet "${args[@]}"
  touch "$stamp"
fi

if [ "${1:-}" = "--dev" ] && [ ! -x /usr/bin/chromium ]; then
  # The browser test drives Debian's chromium through Playwright (Playwright's own browser
  # download is not used).
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser test"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: no apt-get; install Chromium at /usr/bin/chromium for the browser test"
  fi
fi
