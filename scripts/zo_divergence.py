"""Summarise ``scripts/zo_divergence.sh``: one row per run, a verdict per run, the loss curves.

    python scripts/zo_divergence.py results/zo-divergence/smollm2-135m-sst2-lr1e-2

The loss is the cross-entropy over the task's label words, so a model that cannot tell the classes apart
scores ln 2 and the zero-shot model starts near it (0.7-1.0 on the first batches). Verdicts:

- *blew up*: stopped on a non-finite loss (the guard is off), or the training loss, as a running mean over
  ``WINDOW`` steps, rose above ``RISE`` x ln 2 (twice a uniform guess);
- *overflowed*: the losses sit at ln 2 with a zero projected gradient from some step to the end. Replaying
  such a run (AdaZeta, seed 0, lr 3e-3) showed why: adapter outputs reached 8e26, their squares are inf in
  float32, and the final RMSNorm maps the hidden states to exact zeros, so every logit is 0 and no
  perturbation moves the loss. ``leanft.zo`` now treats that as divergence (a run with the guard off
  stops there, and its log says "did not change under any perturbation"); logs written before that
  kept running at ln 2, and both are read the same way here.

A first version compared the running mean with its own first window, which hid runs that blew up within
that window; the table says which criterion made it. Writes ``README.md`` and ``loss.png`` into the folder.
"""

import json
import sys
from pathlib import Path

import numpy as np

from leanft.measure.report import _pyplot

WINDOW, RISE = 25, 2.0
CHANCE = float(np.log(2))


def summarise(log: Path) -> dict:
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    name = log.stem
    variant, seed = name.rsplit("-seed", 1)
    loss = np.array([r["loss"] for r in rows])
    smooth = np.convolve(loss, np.ones(WINDOW) / WINDOW, mode="valid") if len(loss) >= WINDOW else loss
    tail = log.with_suffix(".tail.txt")
    said = tail.read_text() if tail.is_file() else ""
    stopped, flat_stop = "guard is off" in said, "did not change under any perturbation" in said
    above = np.nonzero(smooth > RISE * CHANCE)[0]
    offset = WINDOW - 1 if len(loss) >= WINDOW else 0
    at = rows[above[0] + offset]["forwards"] if len(above) else None
    flat = [abs(r["loss"] - CHANCE) < 1e-3 and r["projected_grad"] == 0 for r in rows]
    first = len(flat)  # where the run of flat steps that ends the log begins
    while first and flat[first - 1]:
        first -= 1
    since = (rows[first]["forwards"] if len(flat) - first >= WINDOW
             else rows[-1]["forwards"] + 2 if flat_stop else None)
    why = (f"overflowed (flat at ln 2 from {since})" if since else "non-finite" if stopped
           else f"blew up (x{RISE:g} ln 2 at {at})" if at else "")
    result = log.with_suffix(".json")
    acc = json.loads(result.read_text())["eval"]["sst2"]["accuracy"] if result.is_file() else None
    return {"variant": variant, "seed": int(seed), "steps": rows[-1]["step"], "forwards": rows[-1]["forwards"],
            "q_last": rows[-1]["queries"], "start": smooth[0], "end": smooth[-1], "max": smooth.max(),
            "diverged": bool(why), "why": why,
            "accuracy": acc, "rows": rows, "smooth": smooth}


def main(folder: Path) -> None:
    runs = sorted((summarise(f) for f in folder.glob("*-seed*.jsonl")), key=lambda r: (r["variant"], r["seed"]))
    lines = [f"Training loss (running mean over {WINDOW} steps). Diverged: stopped on a non-finite loss; blew up (the "
             f"running mean rose above {RISE:g} x ln 2 = {RISE * CHANCE:.3f}); or overflowed (activations past float32's "
             f"range, zeroed by the final norm: loss flat at ln 2, projected gradient 0); forward passes when it happened. See scripts/zo_divergence.py.",
             "",
             "| run | seed | steps | forwards | Q at end | loss start | loss end | loss max | diverged | eval accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        acc = "stopped" if r["accuracy"] is None else f"{r['accuracy']:.1f}"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['forwards']} | {r['q_last']} | {r['start']:.3f} "
                     f"| {r['end']:.3f} | {r['max']:.3f} | {r['why'] or 'no'} | {acc} |")
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for r in runs:
        first = r["variant"] not in colours
        colour = colours.setdefault(r["variant"], f"C{len(colours)}")
        x = [row["forwards"] for row in r["rows"]][len(r["rows"]) - len(r["smooth"]):]
        ax.plot(x, r["smooth"], color=colour, label=r["variant"] if first else None, lw=1)
    ax.set(xlabel="forward passes", ylabel=f"training loss (running mean, {WINDOW} steps)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
