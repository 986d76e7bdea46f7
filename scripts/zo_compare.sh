#!/usr/bin/env bash
# Zeroth-order methods under the same budget of forward passes, same samples, then one table.
#   FORWARDS=400 bash scripts/zo_compare.sh
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-sst2}
FORWARDS=${FORWARDS:-400}
METHODS=${METHODS:-mezo-lora adazeta mezo}
OUT=${OUT:-results/zo/$MODEL-$TASK-$FORWARDS}
before=--eval-before
for method in $METHODS; do
  leanft train --model "$MODEL" --task "$TASK" --method "$method" --num-train 1000 --num-dev 0 --num-eval 500 \
    --batch-size 16 --max-steps 100000 --max-forwards "$FORWARDS" --scheduler constant --seed 0 $before \
    --output-dir "runs/zo/$MODEL-$TASK/$method" "$@"
  mkdir -p "$OUT"
  cp "runs/zo/$MODEL-$TASK/$method/metrics.json" "$OUT/$method.json"
  cp "runs/zo/$MODEL-$TASK/$method/metrics.jsonl" "$OUT/$method.jsonl"
  before=--no-eval-before
done
leanft report $(for m in $METHODS; do echo "$OUT/$m.json"; done) --plot "$OUT/loss.png" | tee "$OUT/README.md"
