#!/usr/bin/env bash
# Zeroth-order methods under the same budget of forward passes, same samples, then one table:
# compare_methods.sh with a forward-pass budget instead of one epoch.
#   FORWARDS=400 bash scripts/zo_compare.sh
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-sst2}
FORWARDS=${FORWARDS:-400}
export MODEL TASK METHODS=${METHODS:-mezo-lora adazeta mezo} OUT=${OUT:-results/zo/$MODEL-$TASK-$FORWARDS} \
  RUNS=${RUNS:-runs/zo/$MODEL-$TASK}
exec bash "$(dirname "$0")/compare_methods.sh" --num-dev 0 --batch-size 16 --max-steps 100000 \
  --max-forwards "$FORWARDS" --scheduler constant "$@"
