#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian/Ubuntu machine and run it.
#   - Debian packages: chromium (the dashboard test drives real headless Chromium)
#   - a virtual environment in .venv with the project and its test extra
# Extra arguments go to pytest, e.g.:  bash scripts/test.sh -k policy -x
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    echo ">> installing Debian packages: chromium"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
  else
    echo ">> apt-get not found: the dashboard browser test will be skipped (no chromium)"
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv"
  "$PY" -m venv .venv
fi
echo ">> installing lemonade-inferos with the test extra"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

echo ">> running the tests"
exec .venv/bin/python -m pytest "$@"
