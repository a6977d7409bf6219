#!/usr/bin/env bash
# Create .venv and install regrad with the given extras (default: test extras).
# torch is pinned to 2.13.0 (CPU wheel); installing it first keeps pip from pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[${EXTRAS}]"
