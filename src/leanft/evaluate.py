"""Task metrics of a model: candidate scoring for classification and multiple choice, greedy generation
for generation tasks; sharded over data-parallel processes and gathered on every rank."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from . import models, objectives, tasks
from .config import TrainConfig
from .loading import Loaded, accelerator, load_tasks
from .precision import dtype_of
from .tasks.collate import encode, to_device


@torch.no_grad()
def evaluate(run: Loaded, task: tasks.Task, examples: list[dict]) -> dict[str, float]:
    """Task metrics on ``examples``; each process scores every ``num_processes``-th example."""
    accel, cfg = run.accelerator, run.cfg
    was_training = run.net.training
    run.net.eval()
    shard = examples[accel.process_index :: accel.num_processes]
    preds: list[tuple[int, Any]] = []
    for start in range(0, len(shard), cfg.eval_batch_size):
        chunk = shard[start : start + cfg.eval_batch_size]
        idx = range(accel.process_index + start * accel.num_processes, len(examples), accel.num_processes)
        with run.precision.autocast():
            if task.kind == "generation":
                out = generate(run, task, chunk)
                if task.answer_loss:
                    out = list(zip(out, *answer_nll(run, task, chunk)))
            else:
                batch = encode(task, chunk, run.tokenizer, cfg.max_length, run.decoder)
                _, scores = objectives.batch_loss(run.net, to_device(batch, run.device), run.decoder)
                out = [int(s.argmax()) for s in scores]
        preds += list(zip(idx, out))
    preds = sorted(gather_object(preds)) if accel.num_processes > 1 else preds
    run.net.train(was_training)
    values = [p for _, p in preds]
    if task.kind == "generation":
        texts = [v[0] for v in values] if task.answer_loss else values
        metrics = (task.scorer or tasks.score_generation)(texts, [task.references(ex) for ex in examples])
        if task.answer_loss:
            loss = sum(v[1] for v in values) / sum(v[2] for v in values)
            metrics.update(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf)
        return metrics
    return tasks.classification_metrics(values, [task.label(ex) for ex in examples], task.num_labels)


def answer_nll(run: Loaded, task: tasks.Task, examples: list[dict]) -> tuple[list[float], list[int]]:
    """Per example, the negative log-likelihood summed over the gold answer's tokens (EOS included) and
    their count, as training scores them: a token-weighted loss and perplexity come from the sums."""
    batch = to_device(encode(task, examples, run.tokenizer, run.cfg.max_length, run.decoder, training=True),
                      run.device)
    net = run.net.module if isinstance(run.net, DistributedDataParallel) else run.net  # ranks run unequal counts
    token_logp = net(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], batch["targets"])
    n = len(examples)
    nll = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], -token_logp.float())
    count = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], torch.ones_like(token_logp))
    return nll.tolist(), [int(c) for c in count.tolist()]


def generate(run: Loaded, task: tasks.Task, examples: list[dict]) -> list[str]:
    """Greedy generation from the prompts (left-padded), cut at the first newline for one-line tasks."""
    tokenizer = run.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer([task.prompt(ex) for ex in examples], return_tensors="pt", padding=True).to(run.device)
    tokenizer.padding_side = side
    out = run.model.generate(**enc, max_new_tokens=run.cfg.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip().split("\n")[0] if task.first_line else t.strip() for t in texts]


def _load_adapter(base, adapter_dir: Path, model_name: str):
    """``PeftModel.from_pretrained``, with an adapter made for another base model (wrong shapes, missing
    modules or layers) refused in one sentence instead of a state-dict traceback or a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base, adapter_dir)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ValueError(f"the adapter in {adapter_dir} does not fit the base model {model_name!r} that its "
                             f"leanft_run.json names ({first})") from e
    missing = [w for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        raise ValueError(f"the adapter in {adapter_dir} does not fit the base model {model_name!r}: "
                         f"{str(missing[0].message)[:300]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def evaluate_saved(adapter_dir: str | Path, cfg: TrainConfig, base_model: str | None = None) -> dict[str, dict[str, float]]:
    """Evaluate a saved ``best/`` folder (a PEFT adapter, or a fully fine-tuned model) on cfg's tasks, on
    the base model its ``leanft_run.json`` names or on ``base_model`` (``leanft eval --model``)."""
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / "leanft_run.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a leanft run output (no leanft_run.json)")
    info = json.loads(info_file.read_text())
    if base_model and base_model != info["model"]:  # the base moved (another folder, the same weights)
        print(f"evaluating on {base_model} (the run was trained on {info['model']})")
    cfg.model, cfg.method = base_model or info["model"], info["method"]
    if not (cfg.train_file or cfg.dataset or cfg.task):
        cfg.task = ",".join(info["tasks"])
    task_data = load_tasks(cfg)
    accel = accelerator()
    decoder = models.model_kind(cfg.model) == "causal"
    num_labels = max(t.num_labels for t, _ in task_data)
    dtype = dtype_of(cfg.dtype)
    if (adapter_dir / "adapter_config.json").is_file():
        base, tokenizer = models.load_model(cfg.model, num_labels=num_labels, dtype=dtype)
        model = _load_adapter(base, adapter_dir, cfg.model)
    else:
        model, tokenizer = models.load_model(str(adapter_dir), num_labels=num_labels, dtype=dtype,
                                             task="causal" if decoder else "seq_cls")
    model = model.to(accel.device).eval()
    run = Loaded(model, objectives.network(model, decoder), tokenizer, decoder, accel, cfg)
    return {t.name: evaluate(run, t, splits.eval) for t, splits in task_data}
