#!/usr/bin/env bash
# Real-question evaluation of a meta checkpoint on the general mix's test split (every
# system incl. the controls, per-set tables), given passages and BM25 retrieval, then the
# targets check. CPU defaults: LIMIT questions per set (200 = every test question).
# Each JSON is saved after every system: rerunning the same command resumes where it stopped.
#   bash benchmarks/real_qa.sh [CHECKPOINT] [LIMIT] [RETRIEVAL_LIMIT] [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
META="${1:-regrad_engine/checkpoints/smollm2-135m-general}"
LIMIT="${2:-200}"
RLIMIT="${3:-$LIMIT}"
TAG="${4:-local}"
PY=.venv/bin
[ -d runs/general ] || $PY/regrad data --out runs/general
$PY/regrad eval --data runs/general --meta "$META" --limit "$LIMIT" --threads 2 \
    --out "benchmarks/results/general_given_${TAG}.json" | tee "benchmarks/results/general_given_${TAG}.md"
$PY/regrad eval --data runs/general --meta "$META" --limit "$RLIMIT" --threads 2 --setting retrieval \
    --out "benchmarks/results/general_retrieval_${TAG}.json" | tee "benchmarks/results/general_retrieval_${TAG}.md"
$PY/python benchmarks/targets.py --given "benchmarks/results/general_given_${TAG}.json" \
    --retrieval "benchmarks/results/general_retrieval_${TAG}.json" | tee "benchmarks/results/general_targets_${TAG}.md"
