#!/usr/bin/env bash
# The two exact starts of the LoRETTA methods side by side: the noise-free start (frozen copies of the
# initial factors, subtracted) against zeroing one TT core, on the same samples, per TT rank and seed.
#   METHOD=loretta-rep TT_RANKS="2 4 8" SEEDS="0 1 2" bash scripts/compare_starts.sh
# Budget: 400 train, 100 dev, 300 eval, one epoch at batch 8 (the bench's quick budget). Extra
# arguments go to every run. Writes one JSON per run and a table of mean and standard deviation.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-sst2}
METHOD=${METHOD:-loretta-rep}
TT_RANKS=${TT_RANKS:-2 4 8}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-results/starts/$MODEL-$TASK-$METHOD}
RUNS=${RUNS:-runs/starts/$MODEL-$TASK-$METHOD}
mkdir -p "$OUT"
for tt in $TT_RANKS; do
  for seed in $SEEDS; do
    for start in noise_free zero_core; do
      name="$start-tt$tt-seed$seed"
      [ -f "$OUT/$name.json" ] && continue  # done already: an interrupted comparison resumes
      leanft train --model "$MODEL" --task "$TASK" --method "$METHOD" --init-mode "$start" --tt-rank "$tt" \
        --seed "$seed" --num-train 400 --num-dev 100 --num-eval 300 --epochs 1 --batch-size 8 \
        --no-eval-before --output-dir "$RUNS/$name" "$@"
      cp "$RUNS/$name/metrics.json" "$OUT/$name.json"
    done
  done
done
python3 - "$OUT" "$RUNS" <<'PY' | tee "$OUT/README.md"
import json, pathlib, statistics, sys
out, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = []
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    r["adapter_bytes"] = sum(x.stat().st_size for x in (work / f.stem / "best").glob("*.safetensors"))
    runs.append(r)
rows = {}
for r in runs:
    options = r["config"]["method_options"]
    key = (options["tt_rank"], options["init_mode"])
    rows.setdefault(key, []).append(r)
print(f"| tt rank | start | accuracy (mean ± sd over seeds) | seeds | trainable | s/step | adapter MB on disk |")
print("|---|---|---|---|---|---|---|")
for (tt, start), rs in sorted(rows.items()):
    acc = [next(iter(r["eval"].values()))["accuracy"] for r in rs]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    size = statistics.mean(r.get("adapter_bytes", 0) for r in rs) / 2**20
    print(f"| {tt} | {start} | {statistics.mean(acc):.1f} ± {sd:.1f} | {len(acc)} | {rs[0]['trainable']:,} | "
          f"{statistics.mean(r['time_per_step_s'] for r in rs):.2f} | {size:.2f} |")
PY
