"""Task metrics of a model: candidate scoring for classification and multiple choice, greedy generation
for generation tasks; sharded over data-parallel processes and gathered on every rank."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.nn.parallel import DistributedDataParallel

from . import objectives, tasks
from .config import TrainConfig
from .loading import Loaded, load_saved, read_json
from .runfolder import predictions_file
from .tasks import load_tasks
from .tasks.collate import generation_prompts, to_device


@torch.no_grad()
def evaluate(run: Loaded, task: tasks.Task, examples: list[dict],
             predictions: Path | None = None) -> dict[str, float]:
    """Task metrics on ``examples``; each process scores every ``num_processes``-th example. With
    ``predictions``, the main process also writes there what the model answered to each example
    (``_prediction_rows``), one JSON line per example."""
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
                batch = run.tokenized.batch(task, chunk)
                _, scores = objectives.batch_loss(run.net, to_device(batch, run.device), run.decoder)
                out = [int(s.argmax()) for s in scores]
        preds += list(zip(idx, out))
    preds = sorted(gather_object(preds)) if accel.num_processes > 1 else preds
    run.net.train(was_training)
    values = [p for _, p in preds]
    if predictions is not None and accel.is_main_process:
        rows = _prediction_rows(run, task, examples, values)
        predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if task.kind == "generation":
        texts = [v[0] for v in values] if task.answer_loss else values
        metrics = (task.scorer or tasks.score_generation)(texts, [task.references(ex) for ex in examples])
        if task.answer_loss:
            loss = sum(v[1] for v in values) / sum(v[2] for v in values)
            metrics.update(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf)
        return metrics
    return tasks.classification_metrics(values, [task.label(ex) for ex in examples], task.num_labels)


def _prediction_rows(run: Loaded, task: tasks.Task, examples: list[dict], values: list) -> list[dict]:
    """Per example: its index in the split, what the model read (a decoder's prompt, an encoder's text pair),
    and its answer with the reference: a generated text with its best-reference scores (and the loss of the
    gold answer's tokens), or the chosen candidate with the gold one."""
    rows = []
    for i, (ex, value) in enumerate(zip(examples, values)):
        row = {"index": i, "input": task.prompt(ex) if run.decoder else task.encoder_text(ex)}
        if task.kind == "generation":
            text = value[0] if task.answer_loss else value
            row.update(prediction=text, references=task.references(ex),
                       **tasks.example_scores(text, task.references(ex)))
            if task.answer_loss:
                row["loss"] = value[1] / value[2]
        else:
            candidates, gold = task.candidates(ex), task.label(ex)
            row.update(prediction=candidates[value], label=candidates[gold], correct=value == gold)
        rows.append(row)
    return rows


def answer_nll(run: Loaded, task: tasks.Task, examples: list[dict]) -> tuple[list[float], list[int]]:
    """Per example, the negative log-likelihood summed over the gold answer's tokens (EOS included) and
    their count, as training scores them: a token-weighted loss and perplexity come from the sums."""
    batch = to_device(run.tokenized.batch(task, examples, training=True), run.device)
    net = run.net.module if isinstance(run.net, DistributedDataParallel) else run.net  # ranks run unequal counts
    token_logp = net(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], batch["targets"])
    n = len(examples)
    nll = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], -token_logp.float())
    count = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], torch.ones_like(token_logp))
    return nll.tolist(), [int(c) for c in count.tolist()]


def generate(run: Loaded, task: tasks.Task, examples: list[dict]) -> list[str]:
    """Greedy generation from the prompts (cut to fit as ``generation_prompts`` says, left-padded), cut at
    the first newline for one-line tasks."""
    tokenizer, cfg = run.tokenizer, run.cfg
    ids, _ = generation_prompts(task, examples, tokenizer, cfg.max_length, cfg.max_new_tokens)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(run.device)
    tokenizer.padding_side = side
    out = run.model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip().split("\n")[0] if task.first_line else t.strip() for t in texts]


def context_length(model) -> int | None:
    """The model's context in tokens (``max_position_embeddings``, GPT-2's ``n_positions``), None if unknown."""
    config = getattr(model, "config", None)
    return next((n for n in (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions"))
                 if isinstance(n, int)), None)


def report_truncation(run: Loaded, task_data: list[tuple[tasks.Task, tasks.Splits]],
                      splits: tuple[str, ...] = ("train", "dev", "eval"), file=None) -> dict[str, dict[str, int]]:
    """Rows of each task and split whose inputs are cut to fit ``max_length`` (training and evaluation cut
    alike: ``collate``), printed once by the main process to ``file`` and returned for metrics.json.

    A ``max_length`` beyond the model's context, or generation settings that leave no room for a prompt, are
    refused here, before anything runs.
    """
    cfg = run.cfg
    context = context_length(run.model)
    if context is not None and cfg.max_length > context:
        raise ValueError(f"--max-length {cfg.max_length} is beyond the context of {cfg.model} ({context} tokens, its "
                         f"max_position_embeddings): give --max-length {context} or less")
    counts = {}
    for task, split_data in task_data:
        counts[task.name] = {split: sum(truncated_rows(run, task, getattr(split_data, split), split == "train"))
                             for split in splits}
        cut = [f"{n} of {len(getattr(split_data, split))} {split}" for split, n in counts[task.name].items() if n]
        if cut and run.accelerator.is_main_process:
            print(f"{task.name}: {', '.join(cut)} rows are longer than --max-length {cfg.max_length} tokens"
                  f"{_room(run, task)}; {_how_cut(run)}", file=file)
    return counts


def truncated_rows(run: Loaded, task: tasks.Task, examples: list[dict], training: bool) -> list[bool]:
    """Which of ``examples`` are cut to fit, read as training or as evaluation reads them (generation tasks:
    the prompt to generate from and, with ``answer_loss``, the gold answer scored after it)."""
    cfg = run.cfg
    cut = run.tokenized.cut(task, examples, training)
    if task.kind == "generation" and not training:
        generated = generation_prompts(task, examples, run.tokenizer, cfg.max_length, cfg.max_new_tokens)[1]
        cut = [g or (c and task.answer_loss) for g, c in zip(generated, cut)]
    return cut


def _room(run: Loaded, task: tasks.Task) -> str:
    return f" (with --max-new-tokens {run.cfg.max_new_tokens} when generating)" if task.kind == "generation" else ""


def _how_cut(run: Loaded) -> str:
    if run.decoder:
        return "their prompts are cut from the left, the answers kept whole (raise --max-length to keep more)"
    return "their texts are cut from the end (raise --max-length to keep more)"


def evaluate_saved(adapter_dir: str | Path, cfg: TrainConfig, base_model: str | None = None) -> dict[str, dict[str, float]]:
    """Evaluate a saved ``best/`` folder (a PEFT adapter, or a fully fine-tuned model) on cfg's tasks, on
    the base model its ``leanft_run.json`` names or on ``base_model`` (``leanft eval --model``). Each task's
    predictions go into that folder, as ``predictions-<task>-eval.jsonl``; notes go to stderr, so that stdout
    is the metrics' JSON."""
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / "leanft_run.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a leanft run output (no leanft_run.json)")
    info = read_json(info_file)
    if base_model and base_model != info["model"]:  # the base moved (another folder, the same weights)
        print(f"evaluating on {base_model} (the run was trained on {info['model']})")
    cfg.model, cfg.method = base_model or info["model"], info["method"]
    if not (cfg.train_file or cfg.dataset or cfg.task):
        cfg.task = ",".join(info["tasks"])
    task_data = load_tasks(cfg)
    run = load_saved(adapter_dir, cfg, max(t.num_labels for t, _ in task_data))
    report_truncation(run, task_data, ("eval",), file=sys.stderr)
    results = {t.name: evaluate(run, t, splits.eval, predictions_file(adapter_dir, t.name, "eval"))
               for t, splits in task_data}
    if run.accelerator.is_main_process:
        print(f"predictions: {', '.join(str(predictions_file(adapter_dir, t.name, 'eval')) for t, _ in task_data)}",
              file=sys.stderr)
    return results
