#!/usr/bin/env bash
# Create ./.venv (if missing) and install cbir into it with everything it needs.
# PyTorch is the large part: about 5.5 GB in the venv on x86_64 (a CUDA build that also runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
