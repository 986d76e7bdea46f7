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
