"""Side-by-side measurement of methods on one model (forward time for now)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

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
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
        "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows,
    }


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
               ("loretta-rep (AdamW)", "loretta-rep", "first-order"), ("lamda (AdamW)", "lamda", "first-order"),
               ("lamda, P_B frozen (AdamW)", "lamda", "frozen"), ("lamda++, P_B frozen (AdamW)", "lamda++", "frozen"),
               ("full (AdamW)", "full", "first-order"))


def memory_child(model_name: str, method: str, mode: str, task_name: str, batch_size: int, steps: int) -> dict:
    """Peak memory of ``steps`` steps of one kind on one fixed batch, in this (fresh) process.

    ``baseline`` is measured after loading the model and applying the method, so ``peak - baseline`` is
    the working memory of the step itself (activations, gradients, optimiser state, perturbation copies).
    Mode ``"frozen"`` is a first-order step of LaMDA after its freezing phase (P_B frozen, only S trains).
    """
    from . import tasks, train
    from .zo import ZOEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = models.load_model(model_name)
    model = methods.apply_method(model, method, "CAUSAL_LM").to(device)
    task = tasks.get_task(task_name)
    batch = train.to_device(train.encode_candidates(task, tasks.load_splits(task_name, batch_size, 0, 0).train,
                                                    tokenizer, 256), device)
    net = train.CandidateLogProbs(model)
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
                train.forward_loss(net, batch, True)
    elif mode == "zo":
        net.eval()
        engine = ZOEngine(model)
        for step in range(steps):
            engine.step(step, lambda: float(train.forward_loss(net, batch, True)[0]), 1, 1e-6)
    else:
        first_order_times(net, [batch] * steps)
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
                   method_names: list[str] | None = None) -> dict:
    """``memory_child`` for the entries of ``MEMORY_RUNS`` (those of ``method_names`` when given, plus
    inference, the reference), each in its own process (peaks never mix)."""
    import subprocess
    import sys

    rows = []
    for label, method, mode in MEMORY_RUNS:
        if method_names and mode != "inference" and method not in method_names:
            continue
        code = (f"import json, leanft.bench as b; print(json.dumps(b.memory_child({model_name!r}, {method!r}, "
                f"{mode!r}, {task_name!r}, {batch_size}, {steps})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append({"run": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    ref = next(r for r in rows if r["mode"] == "inference")
    for r in rows:
        r["peak_vs_inference"] = round(r["peak_mb"] / ref["peak_mb"], 3)
    return {"model": model_name, "task": task_name, "batch_size": batch_size, "steps": steps,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "date": date.today().isoformat(), "rows": rows}


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
                times = first_order_times(net, batches)
            rows.append({"method": method, "queries": q, "step_s": round(statistics.median(times[1:]), 3),
                         **methods.count_parameters(model)})
        if hasattr(model.base_model, "update_freezing"):  # LaMDA again once P_B is frozen: only S trains
            model.base_model.update_freezing(1, 1)
            rows.append({"method": f"{method} (P_B frozen)", "queries": None,
                         "step_s": round(statistics.median(first_order_times(net, batches)[1:]), 3),
                         **methods.count_parameters(model)})
    return {"model": model_name, "task": task_name, "batch_size": batch_size, "steps": steps,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "date": date.today().isoformat(),
            "rows": rows}


def first_order_times(net: torch.nn.Module, batches: list[dict]) -> list[float]:
    """Seconds of each AdamW step (forward, backward, update) of ``net`` over ``batches``."""
    from . import train

    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for b in batches:
        t0 = time.perf_counter()
        train.forward_loss(net, b, True)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times
