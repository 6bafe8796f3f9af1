#!/usr/bin/env bash
# Install (first run only) and run the demo: synthetic data → train → index → retrieve → evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/cbir-demo "$@"
