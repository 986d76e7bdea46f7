#!/usr/bin/env bash
# AdaZeta's claim, on a CPU budget: MeZO-LoRA, AdaZeta and AdaZeta with a fixed Q=1, same learning rate,
# same forward-pass budget, same samples, divergence guard off (--zo-max-rollbacks 0), seeds 0-2.
#   LR=1e-2 FORWARDS=600 bash scripts/zo_divergence.sh          # then: python scripts/zo_divergence.py OUT
# Every run resumes (--resume): stop it any time and run the script again. A run that reaches a
# non-finite loss stops there (the guard is off) and the script goes on; its log is kept.
set -uo pipefail
MODEL=${MODEL:-smollm2-135m}
LR=${LR:-1e-2}
FORWARDS=${FORWARDS:-600}
SEEDS=${SEEDS:-0 1 2}
VARIANTS=${VARIANTS:-mezo-lora adazeta adazeta-q1}
OUT=${OUT:-results/zo-divergence/$MODEL-sst2-lr$LR}
RUNS=${RUNS:-runs/zo-divergence/$MODEL-sst2-lr$LR}
mkdir -p "$OUT" "$RUNS"
for seed in $SEEDS; do
  for variant in $VARIANTS; do
    case $variant in
      adazeta-q1) args=(--method adazeta --zo-schedule fixed --zo-queries 1) ;;
      *) args=(--method "$variant") ;;
    esac
    run="$RUNS/$variant-seed$seed"
    [ -f "$OUT/$variant-seed$seed.exit" ] && continue  # finished, or stopped by a non-finite loss
    # 64 training rows at batch 4: an epoch is 16 steps, so AdaZeta's per-epoch query count grows
    # within the budget (Q = 2 from epoch 7, 3 from epoch 17) as it does over a long run on more data.
    leanft train --model "$MODEL" --task sst2 "${args[@]}" --lr "$LR" --seed "$seed" --num-train 64 --num-dev 0 \
      --num-eval 200 --batch-size 4 --max-steps 100000 --max-forwards "$FORWARDS" --scheduler constant \
      --zo-max-rollbacks 0 --eval-every 100000 --no-eval-before --output-dir "$run" --resume "$@" \
      >> "$run.log" 2>&1
    code=$?
    echo "$variant seed $seed: exit $code"
    if [ $code = 0 ] || grep -q "guard is off" "$run.log"; then echo $code > "$OUT/$variant-seed$seed.exit"; fi
    cp "$run/metrics.jsonl" "$OUT/$variant-seed$seed.jsonl" 2>/dev/null
    cp "$run/metrics.json" "$OUT/$variant-seed$seed.json" 2>/dev/null
    tail -n 3 "$run.log" > "$OUT/$variant-seed$seed.tail.txt"
  done
done
