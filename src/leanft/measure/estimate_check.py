"""The estimator's check: real training steps of a model on this machine, measured, against ``estimate``."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from datetime import date

import torch
from torch import nn

from ..methods import ZO_METHODS, apply_method
from ..models import default_device, load_model, model_kind, task_type
from ..system import RssSampler, rss_mb
from ..zo import OPTIMIZERS
from .estimate import MB, ZO_STEADY_STEPS, _weight_bytes, estimate, step_loss
from .steps import timed_steps, updater

CHECK_METHODS = ("full", "lora", "loretta-rep", "loretta-adp", "lamda", "mezo", "adazeta")


def train_steps(model: nn.Module, method: str, ids: torch.Tensor, causal: bool, steps: int,
                zo_optimizer: str = "sgd") -> None:
    """``steps`` training steps as leanft takes them (``measure.steps.updater``): AdamW for first-order
    methods, SPSA steps of ``zo_optimizer`` with the fewest queries it takes for zeroth-order ones."""
    objective = lambda net, batch: step_loss(net, batch, causal)  # noqa: E731
    queries = OPTIMIZERS[zo_optimizer].min_queries
    timed_steps(updater(model, model, objective, method in ZO_METHODS, queries, zo_optimizer=zo_optimizer),
                [ids] * steps)


def steady_steps(method: str, steps: int) -> int:
    """Steps to measure so the last is in the estimate's steady state: a zeroth-order run's noise cache
    fills over its first ``ZO_STEADY_STEPS``; AdamW's state exists from the second step on."""
    return max(steps, ZO_STEADY_STEPS) if method in ZO_METHODS else steps


def cpu_allocated_peak(run) -> int:
    """Peak bytes held by the CPU allocator for what ``run()`` allocates (the profiler's memory events).
    Garbage from before is collected first: freed during ``run()`` it would count against its peak (a
    zeroth-order engine and its optimiser refer to each other, so only the cycle collector frees them)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def random_ids(vocab_size: int, pad_id: int | None, batch_size: int, seq_len: int) -> torch.Tensor:
    """Token ids without the pad token (the sequences are full, as the estimate assumes)."""
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    if pad_id is not None:
        ids[ids == pad_id] = (pad_id + 1) % vocab_size
    return ids


def measure(model_name: str, method: str, batch_size: int, seq_len: int, steps: int = 2) -> dict:
    """Peak memory (MB) of ``steps`` real training steps in this process; run it in a fresh one (``check``).

    CUDA: ``max_memory_allocated`` with the model on the GPU. CPU: the highest resident memory while the
    steps run minus that before the model was loaded (allocator overhead and runtime pages included), and
    then, for the same steps again, the CPU allocator's own peak plus the weights (``allocated_mb``).
    Two steps by default: AdamW's state exists from the first update on, so the second is the steady state;
    zeroth-order methods take at least ``ZO_STEADY_STEPS`` (``steady_steps``).
    """
    device = default_device().type
    steps = steady_steps(method, steps)
    gc.collect()
    before = rss_mb()
    model = load_model(model_name)[0]
    causal = model_kind(model_name) == "causal"
    model = apply_method(model, method, task_type(model_name)).to(device)
    ids = random_ids(model.config.vocab_size, model.config.pad_token_id, batch_size, seq_len).to(device)
    gc.collect()
    result = {"device": device, "steps": steps}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_steps(model, method, ids, causal, steps)
        result["measured_mb"] = round(torch.cuda.max_memory_allocated() / MB, 3)
        return result
    sampler = RssSampler()
    train_steps(model, method, ids, causal, steps)
    result["measured_mb"] = round(sampler.stop() - before, 3)
    allocated = cpu_allocated_peak(lambda: train_steps(model, method, ids, causal, steps))
    result["allocated_mb"] = round((_weight_bytes(model) + allocated) / MB, 3)
    return result


def check(model_name: str, method: str, batch_size: int, seq_len: int, steps: int = 2) -> dict:
    """``estimate`` (float32, this machine's device) against ``measure`` in a fresh process, with the
    relative error ``(estimate - measured) / measured`` (and against the CPU allocator's peak on CPU)."""
    code = (f"import json, leanft.measure.estimate_check as e; print(json.dumps(e.measure({model_name!r}, {method!r}, "
            f"{batch_size}, {seq_len}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring {method} on {model_name} failed:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    row = {**estimate(model_name, method, batch_size, seq_len, device=measured["device"]), **measured}
    for key in ("measured_mb", "allocated_mb"):
        if key in measured:
            row[key.replace("_mb", "_error")] = round((row["total_mb"] - measured[key]) / measured[key], 3)
    return row


def check_all(models: tuple[str, ...] = ("smollm2-135m", "minilm-l6"), methods: tuple[str, ...] = CHECK_METHODS,
              batch_size: int = 8, seq_len: int = 128, steps: int = 2) -> dict:
    """``check`` of every (model, method): the estimator's error on models whose steps can run here."""
    rows = [check(name, m, batch_size, seq_len, steps) for name in models for m in methods]
    return {"kind": "estimate vs measured", "device": rows[0]["device"], "batch_size": batch_size,
            "seq_len": seq_len, "steps": steps, "date": date.today().isoformat(), "torch": torch.__version__,
            "rows": rows}
