"""``leanft bench``: every method trained and evaluated under one budget, each run in its own process, then
one report (``report.bench_report``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from .. import methods, models
from ..system import machine, save
from . import tuning
from .budget import RANK_OPTION, SHORT, Budget, default_dtype, default_rank
from .report import bench_report
from .steps import memory_compare


def bench_plan(task_names: list[str], method_names: list[str], ranks: list[int], sweep: list[str],
               task_type: str) -> list[dict]:
    """Runs in order: per task, each method at its defaults, then the rank sweep of the ``sweep`` methods."""
    plan = []
    for task in task_names:
        for method in method_names:
            default = default_rank(method, task_type)
            values = [default] + ([r for r in ranks if r != default] if method in sweep else [])
            for value in values:
                option = RANK_OPTION.get(method)
                slug = method if value == default else f"{method}-{SHORT[option]}{value}"
                plan.append({"task": task, "method": method, "slug": slug, "rank_option": option, "rank": value,
                             "options": {} if value == default else {option: value}})
    return plan


def train_argv(run: dict, model: str, budget: Budget, dtype: str, eval_before: bool) -> list[str]:
    """``leanft train`` arguments of one run (the output folder is added by the caller)."""
    b = budget
    argv = ["--model", model, "--task", run["task"], "--method", run["method"], "--num-train", str(b.train),
            "--num-eval", str(b.eval), "--seed", str(run.get("seed", b.seed)), "--dtype", dtype]
    if "lr" in run:  # a tuned or repeated run (measure.tuning)
        argv += ["--lr", f"{run['lr']:.6g}"]
    if run["method"] in methods.ZO_METHODS:
        argv += ["--num-dev", "0", "--batch-size", str(b.zo_batch), "--max-steps", "1000000000",
                 "--max-forwards", str(b.forwards), "--scheduler", "constant"]
    else:
        argv += ["--num-dev", str(b.dev), "--batch-size", str(b.batch), "--epochs", str(b.epochs)]
    for option, value in run["options"].items():
        argv += ["--" + option.replace("_", "-"), str(value)]
    return argv + ["--eval-before" if eval_before else "--no-eval-before"]


def run_child(argv: list[str], log: Path) -> int:
    """``leanft train argv`` in a fresh process (peaks never mix), its output shown live and kept in ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leanft.cli", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    with open(log, "wb") as f:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            f.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    return proc.wait()


@dataclass
class Bench:
    """One bench: ``model`` on ``tasks`` with ``methods`` under ``budget``, results in ``out`` and the runs'
    checkpoints and logs in ``work``; ``ranks`` sweeps the size knob of the ``sweep`` methods. On CUDA the
    weights are bfloat16 unless ``dtype`` says otherwise."""

    model: str
    tasks: list[str]
    methods: list[str]
    budget: Budget
    out: Path
    work: Path
    ranks: list[int] = field(default_factory=list)
    sweep: list[str] = field(default_factory=lambda: ["lora", "loretta-rep", "loretta-adp"])
    dtype: str | None = None
    memory: bool = True  # also the peak memory of one step of each method, against inference
    force: bool = False  # redo runs whose results exist
    lr_grid: list[float] = field(default_factory=list)  # multiples of each method's default lr, chosen on dev
    seeds: list[int] = field(default_factory=list)  # repeat every run with these seeds (default: the budget's)

    def command(self, dtype: str) -> str:
        spent = ",".join(f"{k}={v}" for k, v in asdict(self.budget).items())
        sweep = ["--ranks", ",".join(map(str, self.ranks)), "--sweep", ",".join(self.sweep)] if self.ranks else []
        sweep += ["--lr-grid", ",".join(f"{m:g}" for m in self.lr_grid)] if self.lr_grid else []
        sweep += ["--seeds", ",".join(map(str, self.seeds))] if self.seeds else []
        return " ".join(["leanft bench --model", self.model, "--tasks", ",".join(self.tasks), "--methods",
                         ",".join(self.methods), "--budget", spent, *sweep, "--dtype", dtype, "--out", str(self.out)])

    def run(self) -> list[dict]:
        """Train and evaluate every planned run in turn, write ``out/<task>/<run>.json`` (+ ``.jsonl`` log)
        for each, then ``out/README.md`` with tables and plots. Returns the run results.

        A run whose result already exists with the same arguments is not redone (an interrupted bench
        resumes); ``force`` redoes everything. A failed run is recorded with its error and the bench goes on.
        """
        dtype = self.dtype or default_dtype()
        plan = bench_plan(self.tasks, [methods.resolve_method(m) for m in self.methods], list(self.ranks),
                          list(self.sweep), models.task_type(self.model))
        self.out.mkdir(parents=True, exist_ok=True)
        save({"model": self.model, "tasks": self.tasks, "budget": asdict(self.budget), "dtype": dtype,
              "machine": machine(), "torch": torch.__version__, "date": date.today().isoformat(),
              "runs": [f"{r['task']}/{r['slug']}" for r in plan], "command": self.command(dtype)},
             self.out / "bench.json")
        results, t0 = [], time.perf_counter()
        for i, run in enumerate(plan):
            first_of_task = i == 0 or plan[i - 1]["task"] != run["task"]
            label = f"[{i + 1}/{len(plan)}] {run['task']} · {run['slug']}"
            print(f"\n{label} · {(time.perf_counter() - t0) / 60:.1f} min elapsed", flush=True)
            results += self.tuned(run, dtype, first_of_task, label)
        info = json.loads((self.out / "bench.json").read_text())
        save({**info, "runs": [f"{r['bench']['task']}/{r['bench']['slug']}" for r in results]}, self.out / "bench.json")
        if self.memory:
            print(f"\npeak memory of one step per method ({self.tasks[0]}, batch {self.budget.batch}), "
                  "each in its own process")
            save(memory_compare(self.model, self.tasks[0], self.budget.batch, 3,
                                list(dict.fromkeys(r["method"] for r in plan)), dtype), self.out / "memory.json")
        (self.out / "README.md").write_text(bench_report(self.out))
        print(f"\nreport: {self.out / 'README.md'}")
        return results

    def tuned(self, run: dict, dtype: str, first_of_task: bool, label: str) -> list[dict]:
        """``run`` as planned, or (with ``lr_grid``/``seeds``) its lr grid on the first seed, the lr chosen
        on dev, then the other seeds at that lr (``measure.tuning``)."""
        seeds = self.seeds or [self.budget.seed]
        if not self.lr_grid and len(seeds) == 1:
            return [self.once(run, dtype, first_of_task, label)]
        base = tuning.default_lr(run["method"], models.task_type(self.model))
        zo = run["method"] in methods.ZO_METHODS
        grid = self.lr_grid if self.lr_grid and not zo and self.budget.dev else [1.0]
        picked = [tuning.variant(run, m, seeds[0], base * m, "select") for m in grid]
        results = [self.once(v, dtype, first_of_task and k == 0, f"{label} @lr x{v['lr_multiplier']:g}")
                   for k, v in enumerate(picked)]
        scores = [tuning.best_dev(self.out / v["task"] / f"{v['slug']}.jsonl") for v in picked]
        chosen = tuning.choose(list(zip(grid, scores))) if len(grid) > 1 else 1.0
        for seed in seeds[1:]:
            v = tuning.variant(run, chosen, seed, base * chosen, "seed")
            results.append(self.once(v, dtype, False, f"{label} @lr x{chosen:g} seed {seed}"))
        for r, score in zip(results, scores + [None] * (len(results) - len(scores))):
            r["bench"].update(chosen=chosen, dev_score=score)
            save(r, self.out / r["bench"]["task"] / f"{r['bench']['slug']}.json")
        return results

    def once(self, run: dict, dtype: str, eval_before: bool, label: str) -> dict:
        """One ``leanft train`` run, or its saved result when one with the same arguments exists."""
        argv = train_argv(run, self.model, self.budget, dtype, eval_before=eval_before)
        target = self.out / run["task"] / f"{run['slug']}.json"
        if target.is_file() and not self.force:
            old = json.loads(target.read_text())
            if old["bench"]["argv"][:-1] == argv[:-1] and not old.get("failed"):
                print(f"{label}: done already ({target})")
                return old
        return self.train_one(run, argv, target, label)

    def train_one(self, run: dict, argv: list[str], target: Path, label: str) -> dict:
        """``leanft train`` of one planned run in its own process; its result (or failure) saved in ``target``."""
        run_dir = self.work / run["task"] / run["slug"]
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        code = run_child(argv + ["--output-dir", str(run_dir)], run_dir / "output.log")
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {**run, "argv": argv, "budget": asdict(self.budget)}
        if code == 0:
            result = {**json.loads((run_dir / "metrics.json").read_text()), "bench": meta}
            shutil.copy(run_dir / "metrics.jsonl", target.with_suffix(".jsonl"))
        else:
            tail = (run_dir / "output.log").read_text(errors="replace").strip().splitlines()[-3:]
            result = {"failed": True, "error": " / ".join(tail), "model": self.model, "method": run["method"],
                      "tasks": [run["task"]], "machine": machine(), "bench": meta}
            print(f"{label} FAILED (exit {code}): see {run_dir / 'output.log'}")
        save(result, target)
        return result
