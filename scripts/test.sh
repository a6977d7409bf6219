#!/usr/bin/env bash
# The whole test suite on CPU (includes the end-to-end test on the embedded model;
# Elasticsearch tests are skipped unless ELASTICSEARCH_URL is set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest "$@"
