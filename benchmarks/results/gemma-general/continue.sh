#!/bin/bash
# Continue the Gemma run from step 160, one process per 20 steps (RSS grows within a process).
cd "$(dirname "$0")/../../.."  # the repository root
for i in $(seq 12); do
  step=$(python3 -c 'import json;print(json.load(open("runs/gemma-general/last/trainer_state.json"))["step"])')
  [ "$step" -ge 400 ] && break
  nice -n 10 .venv/bin/regrad train --model embedded:gemma3-270m --data runs/general --out runs/gemma-general --mode mixed \
    --steps 400 --tasks-per-step 4 --lr 2e-3 --alpha-init 1 --alpha-lr 0.05 \
    --eval-every 20 --dev-size 32 --threads 2 --cpu-bf16 --stop-after 20 || break
done
