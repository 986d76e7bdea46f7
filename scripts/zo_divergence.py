"""Summarise ``scripts/zo_divergence.sh``: one row per run, a verdict per run, the loss curves.

    python scripts/zo_divergence.py results/zo-divergence/smollm2-135m-sst2-lr1e-2

A run *diverged* if it stopped on a non-finite loss (the guard is off) or its training loss, as a running
mean over ``WINDOW`` steps, rose above ``RISE`` times its first such mean; the criterion was fixed before
the runs. Writes ``README.md`` (the table) and ``loss.png`` into the folder.
"""

import json
import sys
from pathlib import Path

import numpy as np

from leanft.measure.report import _pyplot

WINDOW, RISE = 25, 2.0


def summarise(log: Path) -> dict:
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    name = log.stem
    variant, seed = name.rsplit("-seed", 1)
    loss = np.array([r["loss"] for r in rows])
    smooth = np.convolve(loss, np.ones(WINDOW) / WINDOW, mode="valid") if len(loss) >= WINDOW else loss
    stopped = "guard is off" in (log.with_suffix(".tail.txt").read_text() if log.with_suffix(".tail.txt").is_file()
                                 else "")
    above = np.nonzero(smooth > RISE * smooth[0])[0]
    offset = WINDOW - 1 if len(loss) >= WINDOW else 0
    at = rows[above[0] + offset]["forwards"] if len(above) else None
    result = log.with_suffix(".json")
    acc = json.loads(result.read_text())["eval"]["sst2"]["accuracy"] if result.is_file() else None
    return {"variant": variant, "seed": int(seed), "steps": rows[-1]["step"], "forwards": rows[-1]["forwards"],
            "q_last": rows[-1]["queries"], "start": smooth[0], "end": smooth[-1], "max": smooth.max(),
            "diverged": stopped or at is not None, "why": "non-finite" if stopped else (f"x{RISE:g} at {at}" if at else ""),
            "accuracy": acc, "rows": rows, "smooth": smooth}


def main(folder: Path) -> None:
    runs = sorted((summarise(f) for f in folder.glob("*-seed*.jsonl")), key=lambda r: (r["variant"], r["seed"]))
    lines = [f"Training loss (running mean over {WINDOW} steps); diverged = stopped on a non-finite loss, or the running "
             f"mean rose above {RISE:g}x its first value (forward passes when it did).", "",
             "| run | seed | steps | forwards | Q at end | loss start | loss end | loss max | diverged | eval accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        acc = "stopped" if r["accuracy"] is None else f"{r['accuracy']:.1f}"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['forwards']} | {r['q_last']} | {r['start']:.3f} "
                     f"| {r['end']:.3f} | {r['max']:.3f} | {'yes, ' + r['why'] if r['diverged'] else 'no'} | {acc} |")
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
