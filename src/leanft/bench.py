"""Side-by-side measurement of methods: ``run_bench`` (every method trained and evaluated under one
budget, one result file per run, a Markdown report with plots), and the smaller measurements behind it
(forward time, peak memory of one step, seconds per step)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from . import methods, models

DEFAULT_METHODS = ("base", "lora", "loretta-rep", "loretta-adp")


def forward_times(
    model_name: str,
    method_names: tuple[str, ...] = DEFAULT_METHODS,
    batch: int = 8,
    seq_len: int = 64,
    repeats: int = 10,
    warmup: int = 2,
) -> dict:
    """Median forward time of each method's adapted model on the same random batch.

    Methods run round-robin (one forward each per round), so drifts in machine load hit them all alike;
    ``base`` is the model without an adapter. Ratios are against PEFT LoRA when it is measured.
    """
    model, _ = models.load_model(model_name)
    task_type = "CAUSAL_LM" if models.MODEL_KIND.get(model_name, "causal") == "causal" else "SEQ_CLS"
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = {}
    for name in method_names:
        fresh = models.load_model(model_name)[0]
        built[name] = (fresh if name == "base" else methods.apply_method(fresh, name, task_type)).to(device).eval()
    tokens = tokens.to(device)
    samples: dict[str, list[float]] = {name: [] for name in method_names}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, m in built.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(input_ids=tokens)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    samples[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(s) for name, s in samples.items()}
    ref = median.get("lora")
    rows = [
        {"method": name, "forward_ms": round(1000 * t, 2), "vs_lora": round(t / ref, 3) if ref else None,
         **methods.count_parameters(built[name])}
        for name, t in median.items()
    ]
    return {
        "model": model_name, "batch": batch, "seq_len": seq_len, "repeats": repeats, "device": device,
        "machine": machine(),
        "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows,
    }


def machine(device: str | torch.device | None = None) -> str:
    """What a measurement ran on (GPU name, or CPU model and threads): tables never mix two of them.
    ``device`` defaults to the one leanft trains on (CUDA when available)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


def save(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def report(metric_files: list[Path]) -> str:
    """A Markdown table of finished runs (their ``metrics.json``), one row per run, plus zero-shot.

    Zero-shot comes from the runs' evaluation before training (an adapter at its noise-free start
    is the base model), so it costs no extra run. "at end" is what the last step still updated (below
    "trainable" for LaMDA once P_B is frozen); "updates" sums the parameters updated over all steps.
    """
    runs = [json.loads(Path(f).read_text()) for f in metric_files]
    lora = next((r["trainable"] for r in runs if r["method"] == "lora"), None)
    lines = []
    for name in dict.fromkeys(t for r in runs for t in r["tasks"]):
        task_runs = [r for r in runs if name in r["eval"]]
        key = next(iter(task_runs[0]["eval"][name]))
        lines += [f"**{task_runs[0]['model']} on {name}** ({key}; "
                  f"{task_runs[0]['config']['num_train']} train, eval on {task_runs[0]['config']['num_eval']} max)", "",
                  f"| method | {key} | trainable | vs LoRA | at end | updates | peak memory (MB) | s/step | steps "
                  "| wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        zero = next((r["eval_before"][name][key] for r in task_runs if r.get("eval_before")), None)
        if zero is not None:
            lines.append(f"| zero-shot | {zero:.1f} | 0 | | | | | | | |")
        for r in task_runs:
            ratio = f"{r['trainable'] / lora:.3f}x" if lora else ""
            at_end = f"{r['trainable_at_end']:,}" if "trainable_at_end" in r else ""
            updates = f"{r['parameter_updates']:.3g}" if "parameter_updates" in r else ""
            lines.append(f"| {r['method']} | {r['eval'][name][key]:.1f} | {r['trainable']:,} | {ratio} | {at_end} | "
                         f"{updates} | {r['peak_memory_mb']:.0f} | {r['time_per_step_s']:.2f} | {r['steps']} | "
                         f"{r['wall_time_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot_runs(metric_files: list[Path], path: Path) -> None:
    """Training loss of several runs against forward passes, one PNG: methods compared at equal compute.

    Each ``X.json`` needs its log beside it as ``X.jsonl`` (the run's ``metrics.jsonl``); the loss is
    a running mean over a twentieth of the run, so zeroth-order noise does not hide the trend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for f in map(Path, metric_files):
        log = f.with_suffix(".jsonl")
        if not log.is_file():
            raise FileNotFoundError(f"{log}: no training log beside {f} (copy the run's metrics.jsonl there)")
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        rows = [r for r in rows if "loss" in r and not r.get("rolled_back")]
        window = max(1, len(rows) // 20)
        smooth = np.convolve([r["loss"] for r in rows], np.ones(window) / window, mode="valid")
        ax.plot([r["forwards"] for r in rows][window - 1 :], smooth, label=json.loads(f.read_text())["method"])
    ax.set(xlabel="forward passes", ylabel="training loss (running mean)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


MEMORY_RUNS = (("inference", "full", "inference"), ("mezo (full)", "mezo", "zo"), ("mezo-lora", "mezo-lora", "zo"),
               ("adazeta", "adazeta", "zo"), ("lora (AdamW)", "lora", "first-order"),
               ("loretta-rep (AdamW)", "loretta-rep", "first-order"), ("loretta-adp (AdamW)", "loretta-adp", "first-order"),
               ("lamda (AdamW)", "lamda", "first-order"),
               ("lamda, P_B frozen (AdamW)", "lamda", "frozen"), ("lamda++, P_B frozen (AdamW)", "lamda++", "frozen"),
               ("full (AdamW)", "full", "first-order"))


def memory_child(model_name: str, method: str, mode: str, task_name: str, batch_size: int, steps: int,
                 dtype: str = "float32") -> dict:
    """Peak memory of ``steps`` steps of one kind on one fixed batch, in this (fresh) process.

    ``baseline`` is measured after loading the model and applying the method, so ``peak - baseline`` is
    the working memory of the step itself (activations, gradients, optimiser state, perturbation copies).
    Mode ``"frozen"`` is a first-order step of LaMDA after its freezing phase (P_B frozen, only S trains).
    The model, its head and the batch are built as ``leanft train`` builds them, decoders and encoders alike.
    """
    from . import tasks, train
    from .zo import ZOEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = train.TrainConfig(model=model_name, method=method, task=task_name, dtype=dtype, batch_size=batch_size)
    task = tasks.get_task(task_name)
    model, tokenizer, decoder = train.build_model(cfg, [task])
    model.to(device)
    examples = tasks.load_splits(task_name, batch_size, 0, 0).train
    batch = train.task_batches([(0, ex) for ex in examples], [(task, None)], tokenizer, cfg, decoder, device)[0][1]
    net = train.CandidateLogProbs(model) if decoder else model
    if mode == "frozen":
        model.base_model.update_freezing(1, 1)

    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = psutil_rss()
        sampler = RssSampler()
    t0 = time.perf_counter()
    if mode == "inference":
        net.eval()
        with torch.no_grad():
            for _ in range(steps):
                train.forward_loss(net, batch, decoder)
    elif mode == "zo":
        net.eval()
        engine = ZOEngine(model)
        for step in range(steps):
            engine.step(step, lambda: float(train.forward_loss(net, batch, decoder)[0]), 1, 1e-6)
    else:
        first_order_times(net, [lambda: train.forward_loss(net, batch, decoder)[0]] * steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else sampler.stop()
    return {"method": method, "mode": mode, "peak_mb": round(peak, 1), "baseline_mb": round(baseline, 1),
            "step_s": round((time.perf_counter() - t0) / steps, 3), **methods.count_parameters(model)}


def psutil_rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class RssSampler:
    """Highest resident memory of this process while it runs (polled every 2 ms in a thread): the
    lifetime peak (``ru_maxrss``) would include model loading, which is not what a step costs."""

    def __init__(self) -> None:
        import threading

        self.peak, self.running = psutil_rss(), True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, psutil_rss())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, psutil_rss())


def memory_compare(model_name: str, task_name: str, batch_size: int, steps: int = 3,
                   method_names: list[str] | None = None, dtype: str = "float32") -> dict:
    """``memory_child`` for the entries of ``MEMORY_RUNS`` (those of ``method_names`` when given, plus
    inference, the reference), each in its own process (peaks never mix)."""
    import subprocess
    import sys

    rows, failed = [], []
    for label, method, mode in MEMORY_RUNS:
        if method_names and mode != "inference" and method not in method_names:
            continue
        code = (f"import json, leanft.bench as b; print(json.dumps(b.memory_child({model_name!r}, {method!r}, "
                f"{mode!r}, {task_name!r}, {batch_size}, {steps}, {dtype!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            error = (out.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"memory of {label} failed: {error}")
            failed.append({"run": label, "error": error})
            continue
        rows.append({"run": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    ref = next((r for r in rows if r["mode"] == "inference"), None)
    if ref is None:
        raise RuntimeError(f"inference of {model_name} failed, the reference of every peak: {failed[0]['error']}")
    for r in rows:
        r["peak_vs_inference"] = round(r["peak_mb"] / ref["peak_mb"], 3)
    return {"model": model_name, "task": task_name, "batch_size": batch_size, "steps": steps, "dtype": dtype,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "machine": machine(),
            "date": date.today().isoformat(), "rows": rows, "failed": failed}


def step_times(model_name: str, task_name: str, method_names: list[str], batch_size: int = 8, steps: int = 8,
               queries: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Seconds per training step of each method on the same batches (median after one warm-up step).

    First-order methods take an AdamW step; zeroth-order ones (mezo, mezo-lora, adazeta) an SPSA step,
    once per number of queries in ``queries``, to show how a step's cost grows with Q. LaMDA is timed
    twice: while P_B trains and after it is frozen.
    """
    from . import tasks, train
    from .zo import ZOEngine

    task = tasks.get_task(task_name)
    examples = tasks.load_splits(task_name, batch_size * (steps + 1), 0, 0).train
    rows = []
    for method in method_names:
        model, tokenizer = models.load_model(model_name)
        model = methods.apply_method(model, method, "CAUSAL_LM")
        net = train.CandidateLogProbs(model)
        batches = [train.encode_candidates(task, examples[i * batch_size:(i + 1) * batch_size], tokenizer, 256,
                                           gold_only=task.kind != "classification") for i in range(steps + 1)]
        losses = [lambda b=b: train.forward_loss(net, b, True)[0] for b in batches]
        zo = method in methods.ZO_METHODS
        for q in queries if zo else (None,):
            times = []
            if zo:
                net.eval()
                engine = ZOEngine(model)
                for i, b in enumerate(batches):
                    t0 = time.perf_counter()
                    engine.step(i, lambda: float(train.forward_loss(net, b, True)[0]), q, 1e-6)
                    times.append(time.perf_counter() - t0)
            else:
                times = first_order_times(net, losses)
            rows.append({"method": method, "queries": q, "step_s": round(statistics.median(times[1:]), 3),
                         **methods.count_parameters(model)})
        if hasattr(model.base_model, "update_freezing"):  # LaMDA again once P_B is frozen: only S trains
            model.base_model.update_freezing(1, 1)
            rows.append({"method": f"{method} (P_B frozen)", "queries": None,
                         "step_s": round(statistics.median(first_order_times(net, losses)[1:]), 3),
                         **methods.count_parameters(model)})
    return {"model": model_name, "task": task_name, "batch_size": batch_size, "steps": steps,
            "machine": machine(), "date": date.today().isoformat(),
            "rows": rows}


def first_order_times(net: torch.nn.Module, losses: list[Callable[[], torch.Tensor]]) -> list[float]:
    """Seconds of each AdamW step (forward, backward, update) of ``net``, one step per loss function."""
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for loss in losses:
        t0 = time.perf_counter()
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------------
# leanft bench: every method trained and evaluated under one budget, then one report


@dataclass(frozen=True)
class Budget:
    """What every run of a bench gets, so methods compare at equal data and compute.

    First-order runs train ``epochs`` over ``train`` examples at ``batch`` (dev set ``dev`` picks the
    best checkpoint); zeroth-order runs spend exactly ``forwards`` training forward passes (2 per SPSA
    query) at ``zo_batch`` with a constant lr and no dev set (MeZO's protocol). Every run evaluates on
    the same ``eval`` examples; evaluation forwards are not counted in the budget.
    """

    train: int = 1000
    dev: int = 500
    eval: int = 500
    epochs: float = 1.0
    batch: int = 8
    forwards: int = 400
    zo_batch: int = 16
    seed: int = 0


BUDGETS = {
    "smoke": Budget(train=8, dev=0, eval=8, batch=4, forwards=6, zo_batch=4),
    "quick": Budget(train=400, dev=100, eval=300, forwards=300),
    "standard": Budget(),
}
# The size knob a rank sweep turns, per method (the TT methods' size is set by their TT rank).
RANK_OPTION = {"lora": "rank", "mezo-lora": "rank", "lamda": "rank", "lamda++": "rank",
               "loretta-rep": "tt_rank", "loretta-adp": "tt_rank", "adazeta": "tt_rank"}
SHORT = {"rank": "r", "tt_rank": "tt"}


def parse_budget(spec: str) -> Budget:
    """A preset (``smoke``, ``quick``, ``standard``) optionally followed by overrides: ``quick,forwards=600``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    name = parts.pop(0) if parts and "=" not in parts[0] else "standard"
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; presets: {', '.join(BUDGETS)} (then key=value overrides)")
    kinds = {f.name: f.type for f in fields(Budget)}
    values: dict = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in kinds or not value:
            raise ValueError(f"bad budget entry {part!r}; expected key=value with key one of {', '.join(kinds)}")
        values[key] = float(value) if kinds[key] == "float" else int(value)
    budget = replace(BUDGETS[name], **values)
    if budget.forwards % 2 or budget.forwards <= 0:
        raise ValueError(f"forwards={budget.forwards}: the zeroth-order budget must be a positive even number "
                         "(each query costs two forward passes)")
    return budget


def default_rank(method: str, task_type: str) -> int | None:
    """The value of the method's sweep knob in its default config (None for full fine-tuning / MeZO)."""
    option = RANK_OPTION.get(method)
    if option is None:
        return None
    return getattr(methods.make_config(method, task_type), methods.OPTION_FIELDS[method][option])


def default_dtype() -> str:
    """Weights dtype of a bench: bfloat16 on CUDA (how GPUs train), float32 on CPU (bf16 matmuls are slow there)."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


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
            "--num-eval", str(b.eval), "--seed", str(b.seed), "--dtype", dtype]
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
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leanft.cli", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    with open(log, "wb") as f:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            f.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    return proc.wait()


def run_bench(model: str, task_names: list[str], method_names: list[str], budget: Budget, out: Path,
              work: Path, ranks: list[int] = (), sweep: list[str] = ("lora", "loretta-rep", "loretta-adp"),
              dtype: str | None = None, memory: bool = True, force: bool = False) -> list[dict]:
    """Train and evaluate every planned run in turn, write ``out/<task>/<run>.json`` (+ ``.jsonl`` log)
    for each, then ``out/README.md`` with tables and plots. Returns the run results.

    A run whose result already exists with the same arguments is not redone (an interrupted bench
    resumes); ``force`` redoes everything. On CUDA the weights are bfloat16 unless ``dtype`` says
    otherwise. A failed run is recorded with its error and the bench goes on.
    """
    import shutil

    dtype = dtype or default_dtype()
    task_type = "CAUSAL_LM" if models.model_kind(model) == "causal" else "SEQ_CLS"
    plan = bench_plan(task_names, [methods.resolve_method(m) for m in method_names], list(ranks),
                      list(sweep), task_type)
    out.mkdir(parents=True, exist_ok=True)
    info = {"model": model, "tasks": task_names, "budget": asdict(budget), "dtype": dtype, "machine": machine(),
            "torch": torch.__version__, "date": date.today().isoformat(),
            "runs": [f"{r['task']}/{r['slug']}" for r in plan],
            "command": " ".join(["leanft bench --model", model, "--tasks", ",".join(task_names), "--methods",
                                 ",".join(method_names), "--budget", ",".join(f"{k}={v}" for k, v in asdict(budget).items())]
                                + (["--ranks", ",".join(map(str, ranks)), "--sweep", ",".join(sweep)] if ranks else [])
                                + ["--dtype", dtype, "--out", str(out)])}
    save(info, out / "bench.json")
    results, t0 = [], time.perf_counter()
    for i, run in enumerate(plan):
        first_of_task = i == 0 or plan[i - 1]["task"] != run["task"]
        argv = train_argv(run, model, budget, dtype, eval_before=first_of_task)
        target = out / run["task"] / f"{run['slug']}.json"
        if target.is_file() and not force:
            old = json.loads(target.read_text())
            if old["bench"]["argv"][:-1] == argv[:-1] and not old.get("failed"):
                print(f"[{i + 1}/{len(plan)}] {run['task']} · {run['slug']}: done already ({target})")
                results.append(old)
                continue
        elapsed = time.perf_counter() - t0
        print(f"\n[{i + 1}/{len(plan)}] {run['task']} · {run['slug']} · {elapsed / 60:.1f} min elapsed", flush=True)
        run_dir = work / run["task"] / run["slug"]
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        code = run_child(argv + ["--output-dir", str(run_dir)], run_dir / "output.log")
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {**run, "argv": argv, "budget": asdict(budget)}
        if code == 0:
            result = {**json.loads((run_dir / "metrics.json").read_text()), "bench": meta}
            shutil.copy(run_dir / "metrics.jsonl", target.with_suffix(".jsonl"))
        else:
            tail = (run_dir / "output.log").read_text(errors="replace").strip().splitlines()[-3:]
            result = {"failed": True, "error": " / ".join(tail), "model": model, "method": run["method"],
                      "tasks": [run["task"]], "machine": machine(), "bench": meta}
            print(f"[{i + 1}/{len(plan)}] {run['task']} · {run['slug']} FAILED (exit {code}): see {run_dir / 'output.log'}")
        save(result, target)
        results.append(result)
    if memory:
        print(f"\npeak memory of one step per method ({task_names[0]}, batch {budget.batch}), each in its own process")
        save(memory_compare(model, task_names[0], budget.batch, 3, list(dict.fromkeys(r["method"] for r in plan)),
                            dtype), out / "memory.json")
    (out / "README.md").write_text(bench_report(out))
    print(f"\nreport: {out / 'README.md'}")
    return results


def bench_report(out: Path) -> str:
    """``out/README.md`` of a bench: budget, one table per task, peak memory, and the plots beside it.

    Results of different machines never share a report: a folder holding two is an error.
    """
    info = json.loads((out / "bench.json").read_text())
    runs = [json.loads((out / f"{name}.json").read_text()) for name in info["runs"] if (out / f"{name}.json").is_file()]
    mem = json.loads((out / "memory.json").read_text()) if (out / "memory.json").is_file() else None
    seen = {r["machine"] for r in runs} | ({mem["machine"]} if mem else set())
    if len(seen) > 1:
        raise ValueError(f"{out} holds results of {len(seen)} machines ({'; '.join(sorted(seen))}): a table never "
                         "mixes devices; bench each machine into its own folder")
    b = Budget(**info["budget"])
    fo_steps = -(-int(b.train * b.epochs) // b.batch)
    lines = [f"# leanft bench: {info['model']}", "",
             f"Machine: {info['machine']} · weights {info['dtype']} · torch {info['torch']} · {info['date']}", "",
             f"Command: `{info['command']}`", "",
             f"Budget, the same for every run (seed {b.seed}): first-order methods train {b.epochs:g} epoch(s) over "
             f"{b.train} examples at batch {b.batch} (about {fo_steps} AdamW steps; "
             + (f"the checkpoint best on {b.dev} dev examples); " if b.dev else "the last step); ")
             + f"zeroth-order methods spend exactly {b.forwards} training forward passes at batch {b.zo_batch} "
             f"(2 per SPSA query, constant lr, no dev set). All are evaluated on the same {b.eval} examples; "
             "evaluation forwards are not counted.", ""]
    for task in dict.fromkeys(r["tasks"][0] for r in runs):
        task_runs = [r for r in runs if r["tasks"][0] == task]
        lines += task_table(task, task_runs)
        plots = plot_task(out, task, task_runs)
        lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if mem:
        lines += [f"**Peak memory of one step** on one {mem['task']} batch of {mem['batch_size']} "
                  f"({mem['device']}, each in its own process; working = peak minus the model loaded)", "",
                  "| run | peak MB | working MB | vs inference | trainable |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | "
                  f"{r['peak_vs_inference']:.3f}x | {r['trainable']:,} |" for r in mem["rows"]]
        lines += [f"| {r['run']} | failed: {r['error'][:120]} | | | |" for r in mem.get("failed", [])]
        plot_memory(mem, out / "memory.png")
        lines += ["", "![peak memory](memory.png)", ""]
    return "\n".join(lines) + "\n"


def task_table(task: str, runs: list[dict]) -> list[str]:
    """One Markdown table of a task's runs, zero-shot first, ratios against LoRA at its default rank."""
    ok = [r for r in runs if not r.get("failed")]
    key = next(iter(ok[0]["eval"][task])) if ok else "metric"
    lora = next((r["trainable"] for r in ok if r["bench"]["slug"] == "lora"), None)
    lines = [f"## {task} ({key})", "",
             f"| method | rank | {key} | trainable | vs LoRA | params updated | peak MB | s/step | examples/s | steps "
             "| forwards | total s |", "|" + "---|" * 12]
    zero = next((r["eval_before"][task][key] for r in ok if r.get("eval_before")), None)
    if zero is not None:
        lines.append(f"| zero-shot | | {zero:.1f} | 0 | | | | | | | | |")
    for r in runs:
        meta = r["bench"]
        rank = f"{SHORT[meta['rank_option']]}={meta['rank']}" if meta["rank_option"] else ""
        if r.get("failed"):
            lines.append(f"| {meta['method']} | {rank} | failed: {r['error'][:120]} |" + " |" * 9)
            continue
        ratio = f"{r['trainable'] / lora:.3f}x" if lora else ""
        lines.append(f"| {meta['method']} | {rank} | {r['eval'][task][key]:.1f} | {r['trainable']:,} | {ratio} | "
                     f"{r['parameter_updates']:.3g} | {r['peak_memory_mb']:.0f} | {r['time_per_step_s']:.2f} | "
                     f"{r['examples_per_s']:.1f} | {r['steps']} | {r['forward_passes']} | {r['wall_time_s']:.0f} |")
    return lines + [""]


def plot_task(out: Path, task: str, runs: list[dict]) -> list[Path]:
    """A task's plots: accuracy against trainable parameters (log axis; a method's rank sweep is one
    line), first-order training loss, and zeroth-order loss against forward passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if not r.get("failed")]
    if not ok:
        return []
    key = next(iter(ok[0]["eval"][task]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in ok):
        points = sorted((r["trainable"], r["eval"][task][key], r["bench"]) for r in ok if r["method"] == method)
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
        for x, y, meta in points if len(points) > 1 else []:
            ax.annotate(f"{SHORT[meta['rank_option']]}{meta['rank']}", (x, y), textcoords="offset points",
                        xytext=(3, 3), fontsize=7, color=line.get_color())
    zero = next((r["eval_before"][task][key] for r in ok if r.get("eval_before")), None)
    if zero is not None:
        ax.axhline(zero, color="grey", linestyle="--", linewidth=1, label="zero-shot")
    ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel=f"{task} {key}",
           title=f"{ok[0]['model']}: {task} {key} against trainable parameters")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [out / f"accuracy-vs-params-{task}.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    for kind, selected in (("loss", [r for r in ok if r["method"] not in methods.ZO_METHODS]),
                           ("zo-convergence", [r for r in ok if r["method"] in methods.ZO_METHODS])):
        files = [out / task / f"{r['bench']['slug']}.json" for r in selected if r["bench"]["options"] == {}]
        if files:
            paths.append(out / f"{kind}-{task}.png")
            plot_runs(files, paths[-1])
    return paths


def plot_memory(mem: dict, path: Path) -> None:
    """Peak memory of one step per method as bars, with inference as the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mem["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh([r["run"] for r in rows], [r["peak_mb"] for r in rows], color="tab:blue")
    ref = next(r["peak_mb"] for r in rows if r["mode"] == "inference")
    ax.axvline(ref, color="grey", linestyle="--", linewidth=1, label="inference")
    ax.invert_yaxis()
    ax.set(xlabel=f"peak memory of one step, MB ({mem['device']})", title=f"{mem['model']}, batch {mem['batch_size']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
