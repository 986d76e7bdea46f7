"""Time and memory of training steps, measured on real models through the steps training takes
(``optim.FirstOrder`` / ``optim.ZerothOrder``): ``leanft steps``, ``leanft memory``, ``leanft forward``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

import torch

from .. import loading, methods, models, objectives, optim, tasks
from ..config import TrainConfig
from ..precision import Precision
from ..system import RssSampler, machine, release_freed_memory, rss_mb
from ..tasks.collate import encode, to_device
from ..zo import OPTIMIZERS, make_optimizer

DEFAULT_METHODS = ("base", "lora", "loretta-rep", "loretta-adp")
# zeroth-order optimisers measured beside MeZO's sgd, on full-model MeZO and on MeZO-LoRA (--zo-optimizers)
ZO_MEMORY_OPTIMIZERS = ("momentum", "adam", "hizoo", "lozo", "fzoo", "sparse", "sign")
# (row label, method, mode, zeroth-order optimiser of a "zo" step): "frozen" is a first-order step of LaMDA
# after its freezing phase (only S trains).
MEMORY_RUNS = (("inference", "full", "inference", None), ("mezo (full)", "mezo", "zo", "sgd"),
               ("mezo-lora", "mezo-lora", "zo", "sgd"), ("adazeta", "adazeta", "zo", "sgd"),
               ("lora (AdamW)", "lora", "first-order", None),
               ("loretta-rep (AdamW)", "loretta-rep", "first-order", None),
               ("loretta-adp (AdamW)", "loretta-adp", "first-order", None),
               ("lamda (AdamW)", "lamda", "first-order", None),
               ("lamda, P_B frozen (AdamW)", "lamda", "frozen", None),
               ("lamda++, P_B frozen (AdamW)", "lamda++", "frozen", None),
               ("full (AdamW)", "full", "first-order", None),
               # the user's-script path: transformers' LM loss over every token, against inference of that loss
               ("inference, LM loss", "full", "lm-inference", None), ("ZOTrainer, mezo (full)", "mezo", "zotrainer", None),
               ("ZOTrainer, adazeta", "adazeta", "zotrainer", None),
               *((f"{label}, {name}", method, "zo", name) for name in ZO_MEMORY_OPTIMIZERS
                 for label, method in (("mezo (full)", "mezo"), ("mezo-lora", "mezo-lora"))))


def zotrainer_step(model, lm_batch: dict, work_dir: str):
    """One ``leanft.ZOTrainer`` training step on ``lm_batch`` (its Trainer set up, no data loader)."""
    from transformers import TrainingArguments

    from ..hf import ZOTrainer

    args = TrainingArguments(output_dir=work_dir, per_device_train_batch_size=len(lm_batch["input_ids"]),
                             report_to=[], use_cpu=not torch.cuda.is_available(), learning_rate=1e-6)
    trainer = ZOTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    return lambda: trainer.training_step(model, lm_batch)


def task_loss(decoder: bool) -> optim.Objective:
    """The training objective of ``leanft train`` on one encoded batch."""
    return lambda net, batch: objectives.batch_loss(net, batch, decoder)[0]


def updater(model, net, objective: optim.Objective, zeroth_order: bool, queries: int = 1,
            precision: Precision = Precision(), zo_optimizer: str = "sgd"):
    """The step a measurement takes: one-batch SPSA at ``queries`` queries, or AdamW with the method's own
    schedule held still (so each phase of LaMDA is measured on its own), computing as ``precision`` says."""
    if zeroth_order:
        return optim.ZerothOrder(model, net, objective, 1e-6, queries=lambda epoch: queries,
                                 autocast=precision.autocast, optimizer=make_optimizer(zo_optimizer))
    return optim.FirstOrder(model, net, objective, 1e-5, method_schedule=False, autocast=precision.autocast,
                            scaler=precision.scaler())


def timed_steps(step_with, batches: list) -> list[float]:
    """Seconds of each ``step_with.step`` on each batch in turn."""
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        step_with.step(i, 0, [batch])
        times.append(time.perf_counter() - t0)
    return times


def forward_times(model_name: str, method_names: tuple[str, ...] = DEFAULT_METHODS, batch: int = 8, seq_len: int = 64,
                  repeats: int = 10, warmup: int = 2) -> dict:
    """Median forward time of each method's adapted model on the same random batch.

    Methods run round-robin (one forward each per round), so drifts in machine load hit them all alike;
    ``base`` is the model without an adapter. Ratios are against PEFT LoRA when it is measured.
    """
    device = models.default_device()
    built = {}
    for name in method_names:
        fresh = models.load_model(model_name)[0]
        adapted = fresh if name == "base" else methods.apply_method(fresh, name, models.task_type(model_name))
        built[name] = adapted.to(device).eval()
    vocab = next(iter(built.values())).config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    samples: dict[str, list[float]] = {name: [] for name in method_names}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, m in built.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(input_ids=tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    samples[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(s) for name, s in samples.items()}
    ref = median.get("lora")
    rows = [{"method": name, "forward_ms": round(1000 * t, 2), "vs_lora": round(t / ref, 3) if ref else None,
             **methods.count_parameters(built[name])} for name, t in median.items()]
    return {"model": model_name, "batch": batch, "seq_len": seq_len, "repeats": repeats, "device": device.type,
            "machine": machine(), "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows}


def step_times(model_name: str, task_name: str, method_names: list[str], batch_size: int = 8, steps: int = 8,
               queries: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Seconds per training step of each method on the same batches (median after one warm-up step).

    First-order methods take an AdamW step; zeroth-order ones an SPSA step, once per number of queries in
    ``queries``, to show how a step's cost grows with Q. LaMDA is timed twice: while P_B trains and after
    it is frozen.
    """
    task = tasks.get_task(task_name)
    examples = tasks.load_splits(task_name, batch_size * (steps + 1), 0, 0).train
    decoder = models.model_kind(model_name) == "causal"
    rows = []
    for method in method_names:
        model, tokenizer = models.load_model(model_name)
        model = methods.apply_method(model, method, models.task_type(model_name))
        net = objectives.network(model, decoder)
        batches = [encode(task, examples[i * batch_size:(i + 1) * batch_size], tokenizer, 256, decoder, training=True)
                   for i in range(steps + 1)]
        zo = method in methods.ZO_METHODS
        for q in queries if zo else (None,):
            times = timed_steps(updater(model, net, task_loss(decoder), zo, q or 1), batches)
            rows.append({"method": method, "queries": q, "step_s": round(statistics.median(times[1:]), 3),
                         **methods.count_parameters(model)})
        if method in ("lamda", "lamda++"):  # again once P_B is frozen: only S trains
            model.base_model.update_freezing(1, 1)
            times = timed_steps(updater(model, net, task_loss(decoder), False), batches)
            rows.append({"method": f"{method} (P_B frozen)", "queries": None,
                         "step_s": round(statistics.median(times[1:]), 3), **methods.count_parameters(model)})
    return {"model": model_name, "task": task_name, "batch_size": batch_size, "steps": steps, "machine": machine(),
            "date": date.today().isoformat(), "rows": rows}


def one_batch(model_name: str, method: str, task_name: str, dtype: str, batch_size: int):
    """``(model, net, batch, decoder)``: the model with ``method`` on the default device and one training batch of
    ``task_name``, built as ``leanft train`` builds them, decoders and encoders alike."""
    device = models.default_device()
    cfg = TrainConfig(model=model_name, method=method, task=task_name, dtype=dtype, batch_size=batch_size)
    task = tasks.get_task(task_name)
    model, tokenizer, decoder = loading.build_model(cfg, [task])
    model.to(device)
    examples = tasks.load_splits(task_name, batch_size, 0, 0).train
    batch = to_device(encode(task, examples, tokenizer, cfg.max_length, decoder, training=True), device)
    return model, objectives.network(model, decoder), batch, decoder


def zo_step_cost(model_name: str, task_name: str, method: str = "mezo", *, dtype: str = "float32",
                 batch_size: int = 16, queries: int = 1, repeats: int = 5, zo_optimizer: str = "sgd",
                 directions: str | None = None) -> dict:
    """What one zeroth-order step costs against the forwards it must take, in this process, on one batch.

    Forward passes of the unperturbed loss and steps alternate (so drifts in machine load hit both alike);
    the medians give ``vs_forwards`` = step / (forwards per step x one forward). The time spent drawing
    random numbers inside the steps (``Noise.block``) is timed too: ``floor_s`` = forwards x one forward +
    those draws is what a step cannot go below without drawing fewer or cheaper numbers.
    """
    from ..zo import make_optimizer

    model, net, batch, decoder = one_batch(model_name, method, task_name, dtype, batch_size)
    precision = Precision(dtype, models.default_device().type)
    optimizer = make_optimizer(zo_optimizer, directions=directions)
    step_with = optim.ZerothOrder(model, net, task_loss(decoder), 1e-7, queries=lambda epoch: queries,
                                  autocast=precision.autocast, optimizer=optimizer)
    noise, drawing = step_with.engine.noise, [0.0]
    block = noise.block

    def timed_block(*args):
        t0 = time.perf_counter()
        out = block(*args)
        drawing[0] += time.perf_counter() - t0
        return out

    noise.block = timed_block

    def forward() -> float:
        net.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), precision.autocast():
            task_loss(decoder)(net, batch)
        return time.perf_counter() - t0

    forward(), step_with.step(0, 0, [batch])  # warm-up
    forwards, steps_s, draws = [], [], []
    for i in range(repeats):
        forwards.append(forward())
        drawing[0] = 0.0
        t0 = time.perf_counter()
        row = step_with.step(i + 1, 0, [batch])
        steps_s.append(time.perf_counter() - t0)
        draws.append(drawing[0])
    fwd, step, draw = statistics.median(forwards), statistics.median(steps_s), statistics.median(draws)
    n = row["forwards"]
    return {"method": method, "dtype": dtype, "zo_optimizer": zo_optimizer, "directions": optimizer.kind,
            "queries": queries, "forward_s": round(fwd, 3), "step_s": round(step, 3), "forwards": n,
            "vs_forwards": round(step / (n * fwd), 3), "draw_s": round(draw, 3), "floor_s": round(n * fwd + draw, 3),
            "vs_floor": round(step / (n * fwd + draw), 3), "threads": torch.get_num_threads(),
            "trainable": sum(p.numel() for p in step_with.engine.params)}


def memory_child(model_name: str, method: str, mode: str, task_name: str, batch_size: int, steps: int, *,
                 dtype: str = "float32", zo_optimizer: str = "sgd") -> dict:
    """Peak memory of ``steps`` steps of one kind on one fixed batch, in this (fresh) process.

    ``baseline`` is measured after loading the model and applying the method, and before the step's
    updater is built, so ``peak - baseline`` is the working memory of the step itself (activations,
    gradients, optimiser state, perturbation copies; a zeroth-order engine makes its copies and its
    optimiser's state when it is built). The model, its head and the batch are built as ``leanft train``
    builds them, decoders and encoders alike. A "zo" step takes ``zo_optimizer`` with the fewest queries it
    allows (one, two for fzoo).
    """
    device = models.default_device()
    # inference: the model as loaded, in its dtype (full-model MeZO's build is the one that upcasts nothing)
    built = "mezo" if mode in ("inference", "lm-inference") else method
    model, net, batch, decoder = one_batch(model_name, built, task_name, dtype, batch_size)
    if mode == "frozen":
        model.base_model.update_freezing(1, 1)
    precision = Precision(dtype, device.type)
    lm = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
          "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    if mode == "zotrainer":
        step_with = zotrainer_step(model, lm, tempfile.mkdtemp(prefix="leanft-memory-"))
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = rss_mb()
        sampler = RssSampler()
    if mode in ("zo", "first-order", "frozen"):
        queries = OPTIMIZERS[zo_optimizer].min_queries
        step_with = updater(model, net, task_loss(decoder), mode == "zo", queries, precision, zo_optimizer=zo_optimizer)
    t0 = time.perf_counter()
    if mode in ("inference", "lm-inference"):
        net.eval(), model.eval()
        with torch.no_grad(), precision.autocast():
            for _ in range(steps):
                objectives.batch_loss(net, batch, decoder) if mode == "inference" else model(**lm)
    elif mode == "zotrainer":
        for _ in range(steps):
            step_with()
    else:
        timed_steps(step_with, [batch] * steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else sampler.stop()
    return {"method": method, "mode": mode, **({"zo_optimizer": zo_optimizer} if mode == "zo" else {}),
            "peak_mb": round(peak, 1), "baseline_mb": round(baseline, 1),
            "step_s": round((time.perf_counter() - t0) / steps, 3), **methods.count_parameters(model)}


def in_fresh_process(*args, **kwargs) -> dict:
    """``memory_child(*args, **kwargs)`` in a fresh interpreter, so that no other measurement's peak mixes in; a
    failure raises ``RuntimeError`` with the child's last line of error."""
    code = f"import json, leanft.measure.steps as s; print(json.dumps(s.memory_child(*{args!r}, **{kwargs!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_runs(method_names: list[str] | None = None, zo_optimizers: list[str] | None = None) -> list[tuple]:
    """The entries of ``MEMORY_RUNS`` to measure: those of ``method_names`` when given, plus inference (the
    reference); of the zeroth-order steps, those with an optimiser in ``zo_optimizers`` (default: sgd alone)."""
    unknown = sorted(set(zo_optimizers or ()) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"unknown zeroth-order optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    return [(label, method, mode, zo) for label, method, mode, zo in MEMORY_RUNS
            if (not method_names or mode in ("inference", "lm-inference") or method in method_names)
            and (mode != "zo" or zo in (("sgd",) if zo_optimizers is None else zo_optimizers))]


def memory_compare(model_name: str, task_name: str, batch_size: int, steps: int = 3,
                   method_names: list[str] | None = None, dtype: str = "float32",
                   zo_optimizers: list[str] | None = None) -> dict:
    """``memory_child`` for the entries ``memory_runs`` selects, each in its own process (peaks never mix)."""
    rows, failed = [], []
    for label, method, mode, zo_optimizer in memory_runs(method_names, zo_optimizers):
        if mode in ("lm-inference", "zotrainer") and models.model_kind(model_name) != "causal":
            continue  # the Trainer path measured here is language modelling
        try:
            rows.append({"run": label, **in_fresh_process(model_name, method, mode, task_name, batch_size, steps,
                                                          dtype=dtype, **({"zo_optimizer": zo_optimizer} if zo_optimizer else {}))})
        except RuntimeError as e:
            print(f"memory of {label} failed: {e}")
            failed.append({"run": label, "error": str(e)})
    ref = next((r for r in rows if r["mode"] == "inference"), None)
    if ref is None:
        raise RuntimeError(f"inference of {model_name} failed, the reference of every peak: {failed[0]['error']}")
    lm_ref = next((r for r in rows if r["mode"] == "lm-inference"), ref)
    for r in rows:  # ZOTrainer's steps against inference of the same (LM) loss
        r["peak_vs_inference"] = round(r["peak_mb"] / (lm_ref if r["mode"] == "zotrainer" else ref)["peak_mb"], 3)
    return {"model": model_name, "task": task_name, "batch_size": batch_size, "steps": steps, "dtype": dtype,
            "device": models.default_device().type, "machine": machine(), "date": date.today().isoformat(),
            "rows": rows, "failed": failed}
