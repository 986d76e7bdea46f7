"""A bench that tunes and repeats: a learning-rate grid chosen on dev only, several seeds, mean and sd.

For each planned run (a method at one size) of a first-order method with a dev set, ``leanft bench
--lr-grid 0.5,1,2`` first trains at each multiple of the method's default lr with the first seed, picks
the multiple whose best dev score is highest (the evaluation split is never looked at), then repeats the
chosen lr with every other seed of ``--seeds``. Zeroth-order runs (no dev set, MeZO's protocol) keep
their default lr and are only repeated. The report gives, per method and size, the chosen lr and the
mean and sample standard deviation of the evaluation metric over the seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import methods
from ..config import DEFAULT_LR


def default_lr(method: str, task_type: str) -> float:
    return DEFAULT_LR["causal" if task_type == "CAUSAL_LM" else "encoder"][methods.resolve_method(method)]


def variant(run: dict, multiplier: float, seed: int, lr: float, role: str) -> dict:
    """``run`` at ``lr`` (``multiplier`` x the default) and ``seed``; ``group`` names what it repeats."""
    slug = f"{run['slug']}@lr{multiplier:g}-seed{seed}"
    return {**run, "slug": slug, "group": run["slug"], "lr": lr, "lr_multiplier": multiplier, "seed": seed,
            "role": role}


def best_dev(history_file: Path) -> float | None:
    """The best dev score of a run (mean over tasks of each task's first metric), from its metrics log."""
    if not history_file.is_file():
        return None
    scores = [sum(next(iter(m.values())) for m in row["dev"].values()) / len(row["dev"])
              for row in map(json.loads, history_file.read_text().splitlines()) if row.get("dev")]
    return max(scores) if scores else None


def choose(candidates: list[tuple[float, float | None]]) -> float:
    """The lr multiplier with the best dev score; ties go to the one nearest the default (1)."""
    scored = [(score, -abs(m - 1.0), m) for m, score in candidates if score is not None]
    if not scored:
        raise ValueError("no run of the lr grid has a dev score: the grid needs a dev set (budget dev > 0)")
    return max(scored)[2]


def summary_table(task: str, runs: list[dict]) -> list[str]:
    """Mean ± sd over seeds per method and size, at the chosen lr, with the grid's dev scores."""
    ok = [r for r in runs if not r.get("failed") and r["bench"].get("group")]
    if not ok:
        return []
    key = next(iter(ok[0]["eval"][task]))
    lines = [f"**{task}: tuned and repeated** ({key}, mean ± sample sd over seeds at the lr chosen on dev; "
             "grid: dev score per lr multiplier)", "",
             f"| method | size | lr chosen | {key} mean ± sd | seeds | trainable | grid (multiplier: best dev) |",
             "|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys(r["bench"]["group"] for r in ok):
        members = [r for r in ok if r["bench"]["group"] == group]
        chosen = next((r["bench"]["chosen"] for r in members if r["bench"].get("chosen") is not None), 1.0)
        final = [r for r in members if r["bench"]["lr_multiplier"] == chosen]
        values = [r["eval"][task][key] for r in final]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        grid = ", ".join(f"{r['bench']['lr_multiplier']:g}: {r['bench']['dev_score']:.1f}" for r in members
                         if r["bench"]["role"] == "select" and r["bench"].get("dev_score") is not None)
        meta = final[0]["bench"]
        size = f"{meta['rank_option']}={meta['rank']}" if meta.get("rank_option") else ""
        lines.append(f"| {meta['method']} | {size} | {final[0]['lr']:.2g} | {statistics.mean(values):.1f} ± {sd:.1f} | "
                     f"{len(values)} | {final[0]['trainable']:,} | {grid} |")
    return lines + [""]
