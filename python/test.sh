#!/usr/bin/env bash
# Builds and installs the Python module in a fresh virtual environment (`pip install ./python`,
# as the README tells users), then runs the pytest suite in python/tests against the peer
# libraries (pycocotools from PyPI). Run from anywhere; needs ../shared beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DENSEPRED_TEST_VENV:-target/python-test-venv}"
python3 -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet pytest pycocotools pillow safetensors numpy
"$VENV/bin/python" -m pip install ./python
"$VENV/bin/python" -m pytest python/tests -q "$@"
