#!/usr/bin/env bash
# Meta-training speed of the embedded models side by side, on the real mix (`regrad data`):
# the same flags for each (mode mixed, 4 tasks per step, k=3, fresh phi), STEPS steps, then
# tasks/s from the trainer's own clock (training only: the dev loss is not timed).
#   bash benchmarks/train_speed.sh [STEPS] [THREADS] [DEVICE] [MODELS...]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-4}"; THREADS="${2:-2}"; DEVICE="${3:-cpu}"
MODELS="embedded:smollm2-135m-instruct embedded:gemma3-270m"
if [ $# -gt 3 ]; then shift 3; MODELS="$*"; fi
PY=.venv/bin
[ -d runs/general ] || $PY/regrad data --out runs/general
for model in $MODELS; do
    out="runs/train-speed/${model#embedded:}"
    rm -rf "$out"; mkdir -p "$(dirname "$out")"
    $PY/regrad train --model "$model" --data runs/general --out "$out" --mode mixed --steps 240 \
        --tasks-per-step 4 --stop-after "$STEPS" --eval-every "$STEPS" --dev-size 2 --threads "$THREADS" \
        --device "$DEVICE" > "$out.log" 2>&1 || { tail -5 "$out.log"; exit 1; }
    $PY/python - "$out/history.json" "$model" "$STEPS" "$DEVICE" "$THREADS" <<'PY'
import json, sys
history, model, steps, device, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
seconds = json.load(open(history))[-1]["seconds"]
print(f"{model}: {steps} meta-steps x 4 tasks in {seconds:.0f} s = {4 * steps / seconds:.3f} tasks/s "
      f"({seconds / steps:.1f} s/step; {device}, {threads} threads)")
PY
done
