"""``leanft bench``: every method trained and evaluated under one budget, each run in its own process, then
one report (``report.bench_report``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

import torch

from .. import methods, models
from ..system import machine, save
from ..zo import OPTIMIZERS, make_optimizer
from . import tuning
from .budget import RANK_OPTION, SHORT, Budget, default_dtype, default_rank, eval_every, zo_spend
from .report import bench_report
from .steps import memory_compare


def zo_settings(method: str, optimizer: str, queries: int) -> dict:
    """The ``leanft train`` zeroth-order options of one (method, optimiser) run group: the optimiser, and the
    queries per step raised to what it needs (fzoo: 2). AdaZeta keeps its own query schedule (``queries``
    does not apply) unless that schedule starts below the optimiser's minimum: then the fixed schedule."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown zeroth-order optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    fewest = make_optimizer(optimizer).min_queries
    settings: dict = {"zo_optimizer": optimizer}
    if method == "adazeta" and fewest > 1:
        settings["zo_schedule"] = "fixed"
    if max(queries, fewest) != 1 and (method != "adazeta" or fewest > 1):
        settings["zo_queries"] = max(queries, fewest)
    return settings


def bench_plan(task_names: list[str], method_names: list[str], ranks: list[int], sweep: list[str],
               task_type: str, zo_optimizers: list[str] = ("sgd",), zo_queries: int = 1) -> list[dict]:
    """Runs in order: per task, each method at its defaults, then the rank sweep of the ``sweep`` methods;
    a zeroth-order method's each size once per optimiser of ``zo_optimizers`` (slug ``mezo-lora+adam``;
    MeZO's sgd keeps the method's own slug). ``set`` names the trainable set a run group trains."""
    plan = []
    for task in task_names:
        for method in method_names:
            default = default_rank(method, task_type)
            values = [default] + ([r for r in ranks if r != default] if method in sweep else [])
            for value in values:
                option = RANK_OPTION.get(method)
                slug = method if value == default else f"{method}-{SHORT[option]}{value}"
                run = {"task": task, "method": method, "slug": slug, "set": slug, "rank_option": option,
                       "rank": value, "options": {} if value == default else {option: value}}
                if method not in methods.ZO_METHODS:
                    plan.append(run)
                    continue
                for opt in zo_optimizers:  # an optimiser with its own lr scale gets it (train would take MeZO's)
                    own = {"lr": tuning.default_lr(method, task_type, opt)} if opt in tuning.ZO_LR else {}
                    plan.append({**run, "slug": slug if opt == "sgd" else f"{slug}+{opt}",
                                 "zo": zo_settings(method, opt, zo_queries), **own})
    return plan


def zo_run_spend(run: dict, budget: Budget) -> tuple[int, int]:
    """``(steps, forwards)`` the zeroth-order ``run`` will take under ``budget`` (``budget.zo_spend``)."""
    zo = run.get("zo", {})
    adazeta = run["method"] == "adazeta" and zo.get("zo_schedule", "auto") == "auto"
    return zo_spend(budget.forwards, budget.train, budget.zo_batch, zo.get("zo_optimizer", "sgd"),
                    zo.get("zo_queries", 1), adazeta)


def check_forwards(plan: list[dict], budget: Budget) -> None:
    """Refuse a budget some zeroth-order run cannot spend exactly (fzoo and hizoo take 3 forwards a step at
    their fewest queries), naming the nearest budgets every planned run spends exactly."""
    zo_runs = [r for r in plan if r["method"] in methods.ZO_METHODS]
    short = {r["slug"]: zo_run_spend(r, budget)[1] for r in zo_runs}
    short = {slug: spent for slug, spent in short.items() if spent != budget.forwards}
    if not short:
        return

    def fits(f: int) -> bool:
        return all(zo_run_spend(r, replace(budget, forwards=f))[1] == f for r in zo_runs)

    near = sorted((f for f in range(max(2, budget.forwards - 60), budget.forwards + 62, 2) if fits(f)),
                  key=lambda f: abs(f - budget.forwards))[:2]
    raise ValueError(f"forwards={budget.forwards} cannot be spent exactly by "
                     + ", ".join(f"{slug} (stops at {spent})" for slug, spent in short.items())
                     + (f"; budgets every planned run spends exactly: {', '.join(map(str, sorted(near)))}" if near
                        else "; choose a multiple of 6 (fzoo and hizoo take 3 forwards a step at Q=1-2)"))


def train_argv(run: dict, model: str, budget: Budget, dtype: str, eval_before: bool) -> list[str]:
    """``leanft train`` arguments of one run (the output folder is added by the caller)."""
    b = budget
    argv = ["--model", model, "--task", run["task"], "--method", run["method"], "--num-train", str(b.train),
            "--num-eval", str(b.eval), "--seed", str(run.get("seed", b.seed)), "--dtype", dtype]
    if "lr" in run:  # a tuned or repeated run (measure.tuning), or an optimiser's own default
        argv += ["--lr", f"{run['lr']:.6g}"]
    if run["method"] in methods.ZO_METHODS:  # dev evaluated about 15 times along the run
        argv += ["--num-dev", str(b.dev), "--batch-size", str(b.zo_batch), "--max-steps", "1000000000",
                 "--max-forwards", str(b.forwards), "--scheduler", "constant",
                 "--eval-every", str(eval_every(zo_run_spend(run, b)[0]))]
    else:
        argv += ["--num-dev", str(b.dev), "--batch-size", str(b.batch), "--epochs", str(b.epochs)]
    for option, value in {**run["options"], **run.get("zo", {})}.items():
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


def measure_child(function: str, *args, **kwargs) -> dict:
    """``leanft.measure.steps.<function>(*args, **kwargs)`` in a fresh interpreter (nothing else loaded in it);
    a failure raises ``RuntimeError`` with the child's last line of error."""
    code = (f"import json, leanft.measure.steps as s; print(json.dumps(s.{function}(*{args!r}, **{kwargs!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_costs(model: str, task: str, groups: list[tuple[str, str]], batch_size: int, dtype: str) -> dict:
    """One step of each zeroth-order (method, optimiser) group against the forwards it takes, each in its own
    process on one batch, by ``steps.zo_step_cost`` (``vs_forwards``): measured apart from the runs, so runs
    made side by side or on a busy machine do not skew it. A group whose measurement fails is left out."""
    rows = []
    for method, optimizer in groups:
        queries = zo_settings(method, optimizer, 1).get("zo_queries", 1)
        try:
            rows.append(measure_child("zo_step_cost", model, task, method, dtype=dtype, batch_size=batch_size,
                                      zo_optimizer=optimizer, queries=queries))
        except RuntimeError as e:
            print(f"step cost of {method} with {optimizer} failed: {e}")
    return {"model": model, "task": task, "batch_size": batch_size, "dtype": dtype, "machine": machine(),
            "date": date.today().isoformat(), "rows": rows}


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
    memory: bool = True  # also the peak memory of one step of each method against inference, and one forward's time
    force: bool = False  # redo runs whose results exist
    lr_grid: list[float] = field(default_factory=list)  # multiples of each method's default lr, chosen on dev
    seeds: list[int] = field(default_factory=list)  # repeat every run with these seeds (default: the budget's)
    zo_optimizers: list[str] = field(default_factory=lambda: ["sgd"])  # each zeroth-order method with each
    zo_queries: int = 1  # queries per step of zeroth-order runs (raised to 2 for fzoo; AdaZeta schedules its own)

    def command(self, dtype: str) -> str:
        spent = ",".join(f"{k}={v}" for k, v in asdict(self.budget).items())
        sweep = ["--ranks", ",".join(map(str, self.ranks)), "--sweep", ",".join(self.sweep)] if self.ranks else []
        sweep += ["--lr-grid", ",".join(f"{m:g}" for m in self.lr_grid)] if self.lr_grid else []
        sweep += ["--seeds", ",".join(map(str, self.seeds))] if self.seeds else []
        sweep += ["--zo-optimizers", ",".join(self.zo_optimizers)] if self.zo_optimizers != ["sgd"] else []
        sweep += ["--zo-queries", str(self.zo_queries)] if self.zo_queries != 1 else []
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
                          list(self.sweep), models.task_type(self.model), list(self.zo_optimizers), self.zo_queries)
        check_forwards(plan, self.budget)
        self.out.mkdir(parents=True, exist_ok=True)
        save({"model": self.model, "tasks": self.tasks, "budget": asdict(self.budget), "dtype": dtype,
              "zo_queries": self.zo_queries,
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
                                list(dict.fromkeys(r["method"] for r in plan)), dtype,
                                zo_optimizers=list(self.zo_optimizers)), self.out / "memory.json")
            zo = list(dict.fromkeys((r["method"], r["zo"]["zo_optimizer"]) for r in plan if r.get("zo")))
            if zo:
                print(f"\none step of each zeroth-order method and optimiser against its forwards "
                      f"(batch {self.budget.zo_batch})")
                save(step_costs(self.model, self.tasks[0], zo, self.budget.zo_batch, dtype), self.out / "zo-steps.json")
        (self.out / "README.md").write_text(bench_report(self.out))
        print(f"\nreport: {self.out / 'README.md'}")
        return results

    def tuned(self, run: dict, dtype: str, first_of_task: bool, label: str) -> list[dict]:
        """``run`` as planned, or (with ``lr_grid``/``seeds``) its lr grid on the first seed, the lr chosen
        on dev (past the grid's edge when chosen there: ``tuning.select``), then the other seeds at that lr.
        Every choice is remade from the saved runs, so an interrupted bench resumes its extensions too."""
        seeds = self.seeds or [self.budget.seed]
        if not self.lr_grid and len(seeds) == 1:
            return [self.once(run, dtype, first_of_task, label)]
        base = tuning.default_lr(run["method"], models.task_type(self.model), run.get("zo", {}).get("zo_optimizer"))
        grid = sorted(self.lr_grid) if self.lr_grid and self.budget.dev else [1.0]
        results, scores = [], []

        def score(m: float) -> float | None:  # the run at multiplier m of the first seed, trained or found
            v = tuning.variant(run, m, seeds[0], base * m, "select")
            results.append(self.once(v, dtype, first_of_task and not results, f"{label} @lr x{m:g}"))
            scores.append(tuning.best_dev(self.out / v["task"] / f"{v['slug']}.jsonl"))
            return scores[-1]

        chosen, at_edge = grid[0], False
        if len(grid) == 1:  # seeds only (or no dev set to choose on): the default lr
            score(chosen)
        else:
            try:
                chosen, at_edge = tuning.select(grid, score)
            except ValueError as e:  # every run of the grid failed: nothing to repeat
                print(f"{label}: no lr chosen ({e})")
                chosen = None
        for seed in seeds[1:] if chosen is not None else []:
            v = tuning.variant(run, chosen, seed, base * chosen, "seed")
            results.append(self.once(v, dtype, False, f"{label} @lr x{chosen:g} seed {seed}"))
        for r, s in zip(results, scores + [None] * (len(results) - len(scores))):
            r["bench"].update(chosen=chosen, at_edge=at_edge, dev_score=s)
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
