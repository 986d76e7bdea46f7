#!/usr/bin/env bash
# Every method on the same samples with the same budget, then one Markdown table.
#   MODEL=smollm2-135m TASK=sst2 bash scripts/compare_methods.sh
# Zero-shot accuracy is the first run's evaluation before training. Extra arguments go to every run and
# override the defaults here (the last flag wins).
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-sst2}
METHODS=${METHODS:-full lora loretta-rep loretta-adp lamda lamda++}
OUT=${OUT:-results/compare/$MODEL-$TASK}
RUNS=${RUNS:-runs/compare/$MODEL-$TASK}
before=--eval-before
for method in $METHODS; do
  leanft train --model "$MODEL" --task "$TASK" --method "$method" --num-train 1000 --num-eval 500 \
    --epochs 1 --batch-size 8 --seed 0 $before --output-dir "$RUNS/$method" "$@"
  mkdir -p "$OUT"
  cp "$RUNS/$method/metrics.json" "$OUT/$method.json"
  cp "$RUNS/$method/metrics.jsonl" "$OUT/$method.jsonl"
  before=--no-eval-before
done
leanft report $(for m in $METHODS; do echo "$OUT/$m.json"; done) --plot "$OUT/loss.png" | tee "$OUT/README.md"
