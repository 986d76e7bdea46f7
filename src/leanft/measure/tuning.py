"""A bench that tunes and repeats: a learning-rate grid chosen on dev only, several seeds, mean and sd.

For each planned run group (a method at one size, and for zeroth-order methods one optimiser), ``leanft
bench --lr-grid 0.5,1,2`` first trains at each multiple of the group's default lr (``default_lr``) with
the first seed and picks the multiple whose best dev score is highest (the evaluation split is never
looked at). A choice at the grid's smallest or largest multiple may have its optimum beyond the grid, so
the next multiple beyond it (same ratio as the grid's neighbours there) is trained and the choice made
again, up to ``EXTENSIONS`` times (``select``); a choice still at the edge is reported as such. Then the
chosen lr is repeated with every other seed of ``--seeds``. The report gives, per group, the chosen lr
and the mean and sample standard deviation of the evaluation metric over the seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from .. import methods
from ..config import DEFAULT_LR

# Zeroth-order optimisers whose step is not lr x the SPSA estimate need their own lr scale, per trainable set
# (full model: mezo; adapters: mezo-lora, adazeta). adam and sign move each weight by about lr whatever the
# estimate's size. fzoo divides its slopes (l(+eps u) - l0) / eps by the queries' loss spread sigma, about
# eps x |gradient|, so each weight moves by about lr / eps: its lr is eps (1e-3) times adam's and sign's.
# The others (sgd, momentum, hizoo, lozo, sparse) take the method's MeZO lr. Starting points for the grid,
# checked only to be within an order of magnitude: on the tiny test model (20 steps) a step's median move per
# weight is 7e-5 for fzoo against 3e-5 (adam) and 1e-4 (sign) on LoRA, 7e-6 against 3e-6 and 1e-5 on the full
# model (fzoo's moves are heavy-tailed at Q = 2: sigma is the spread of two losses). Encoders and decoders alike.
ZO_LR = {"adam": {"adapters": 1e-4, "full": 1e-5}, "sign": {"adapters": 1e-4, "full": 1e-5},
         "fzoo": {"adapters": 1e-7, "full": 1e-8}}
EXTENSIONS = 3  # at most this many multiples beyond the grid's edge


def default_lr(method: str, task_type: str, zo_optimizer: str | None = None) -> float:
    """The lr a grid's multipliers multiply: the method's default, or its zeroth-order optimiser's."""
    method = methods.resolve_method(method)
    if zo_optimizer in ZO_LR:
        return ZO_LR[zo_optimizer]["full" if method == "mezo" else "adapters"]
    return DEFAULT_LR["causal" if task_type == "CAUSAL_LM" else "encoder"][method]


def variant(run: dict, multiplier: float, seed: int, lr: float, role: str) -> dict:
    """``run`` at ``lr`` (``multiplier`` x the default) and ``seed``; ``group`` names what it repeats."""
    slug = f"{run['slug']}@lr{multiplier:g}-seed{seed}"
    return {**run, "slug": slug, "group": run["slug"], "lr": lr, "lr_multiplier": multiplier, "seed": seed,
            "role": role}


def dev_curve(history_file: Path) -> list[tuple[int | None, float]]:
    """``(forwards so far, dev score)`` of each dev evaluation of a run, from its metrics log; the score is
    the mean over tasks of each task's first metric. Empty when the log is missing (a failed run); forwards
    None in logs older than their count."""
    if not history_file.is_file():
        return []
    return [(row.get("forwards"), sum(next(iter(m.values())) for m in row["dev"].values()) / len(row["dev"]))
            for row in map(json.loads, history_file.read_text().splitlines()) if row.get("dev")]


def best_dev(history_file: Path) -> float | None:
    """The best dev score of a run, from its metrics log."""
    scores = [score for _, score in dev_curve(history_file)]
    return max(scores) if scores else None


def choose(candidates: list[tuple[float, float | None]]) -> float:
    """The lr multiplier with the best dev score; ties go to the one nearest the default (1)."""
    scored = [(score, -abs(m - 1.0), m) for m, score in candidates if score is not None]
    if not scored:
        raise ValueError("no run of the lr grid has a dev score: the grid needs a dev set (budget dev > 0)")
    return max(scored)[2]


def beyond(multipliers: list[float], chosen: float) -> float | None:
    """The next multiplier past the edge ``chosen`` is at, spaced as the edge's neighbour is from it; None
    when ``chosen`` lies inside the grid (or the grid is a single multiplier)."""
    grid = sorted(multipliers)
    if len(grid) < 2 or grid[0] < chosen < grid[-1]:
        return None
    edge, neighbour = (grid[-1], grid[-2]) if chosen == grid[-1] else (grid[0], grid[1])
    return float(f"{edge * edge / neighbour:.6g}")


def select(grid: list[float], score: Callable[[float], float | None],
           extensions: int = EXTENSIONS) -> tuple[float, bool]:
    """The multiplier chosen on dev and whether it is still at the edge of what was tried.

    ``score(m)`` trains (or finds already trained) the run at multiplier ``m`` and returns its best dev score
    (None for a failed run: it counts as worse than any score, so a diverged run past the edge ends the
    search). The grid runs first, then up to ``extensions`` multiples beyond the edge the choice is at.
    """
    scores = {m: score(m) for m in grid}
    for extension in range(extensions + 1):
        chosen = choose(list(scores.items()))
        nxt = beyond(list(scores), chosen)
        if nxt is None:
            return chosen, False
        if extension == extensions:
            return chosen, True
        scores[nxt] = score(nxt)
    raise AssertionError("unreachable")


def label(meta: dict) -> str:
    """A run group's method as tables and plots name it: a zeroth-order optimiser other than MeZO's sgd is
    appended (``mezo-lora+adam``)."""
    optimizer = meta.get("zo", {}).get("zo_optimizer", "sgd")
    return meta["method"] + ("" if optimizer == "sgd" else f"+{optimizer}")


def chosen_runs(members: list[dict]) -> tuple[float | None, list[dict]]:
    """A group's chosen multiplier and its runs at that lr (one per seed); ``(None, members)`` for a run
    that was not tuned, ``(None, [])`` when no lr could be chosen (every run of the grid failed)."""
    if not any("lr_multiplier" in r["bench"] for r in members):
        return None, members
    chosen = next((r["bench"]["chosen"] for r in members if r["bench"].get("chosen") is not None), None)
    return chosen, [r for r in members if chosen is not None and r["bench"]["lr_multiplier"] == chosen]


def grid_scores(members: list[dict]) -> str:
    """The grid's best dev score per multiplier, in order (extensions beyond the edge included)."""
    tried = sorted((r["bench"]["lr_multiplier"], r["bench"].get("dev_score")) for r in members
                   if r["bench"].get("role") == "select")
    return ", ".join(f"{m:g}: {'failed' if s is None else f'{s:.1f}'}" for m, s in tried)


def summary_table(task: str, runs: list[dict]) -> list[str]:
    """Mean ± sd over seeds per method and size, at the chosen lr, with the grid's dev scores."""
    ok = [r for r in runs if not r.get("failed") and r["bench"].get("group")]
    if not ok:
        return []
    key = next(iter(ok[0]["eval"][task]))
    lines = [f"**{task}: tuned and repeated** ({key}, mean ± sample sd over seeds at the lr chosen on dev; "
             "grid: dev score per lr multiplier; \"at the edge\": still the smallest or largest multiplier after "
             f"{EXTENSIONS} more beyond the grid, so the best lr may lie further out)", "",
             f"| method | size | lr chosen | {key} mean ± sd | seeds | trainable | grid (multiplier: best dev) |",
             "|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys(r["bench"]["group"] for r in ok):
        members = [r for r in ok if r["bench"]["group"] == group]
        chosen, final = chosen_runs(members)
        if chosen is None:
            continue
        values = [r["eval"][task][key] for r in final]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        meta = final[0]["bench"]
        edge = " at the edge" if meta.get("at_edge") else ""
        size = f"{meta['rank_option']}={meta['rank']}" if meta.get("rank_option") else ""
        lines.append(f"| {label(meta)} | {size} | {final[0]['lr']:.2g} (x{chosen:g}){edge} | "
                     f"{statistics.mean(values):.1f} ± {sd:.1f} | {len(values)} | {final[0]['trainable']:,} | "
                     f"{grid_scores(members)} |")
    return lines + [""]
