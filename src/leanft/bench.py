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
    is the base model), so it costs no extra run.
    """
    runs = [json.loads(Path(f).read_text()) for f in metric_files]
    lora = next((r["trainable"] for r in runs if r["method"] == "lora"), None)
    lines = []
    for name in dict.fromkeys(t for r in runs for t in r["tasks"]):
        task_runs = [r for r in runs if name in r["eval"]]
        key = next(iter(task_runs[0]["eval"][name]))
        lines += [f"**{task_runs[0]['model']} on {name}** ({key}; "
                  f"{task_runs[0]['config']['num_train']} train, eval on {task_runs[0]['config']['num_eval']} max)", "",
                  f"| method | {key} | trainable | vs LoRA | peak memory (MB) | s/step | steps | wall (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        zero = next((r["eval_before"][name][key] for r in task_runs if r.get("eval_before")), None)
        if zero is not None:
            lines.append(f"| zero-shot | {zero:.1f} | 0 | | | | | |")
        for r in task_runs:
            ratio = f"{r['trainable'] / lora:.3f}x" if lora else ""
            lines.append(f"| {r['method']} | {r['eval'][name][key]:.1f} | {r['trainable']:,} | {ratio} | "
                         f"{r['peak_memory_mb']:.0f} | {r['time_per_step_s']:.2f} | {r['steps']} | {r['wall_time_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)
