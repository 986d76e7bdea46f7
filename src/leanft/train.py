"""One training loop for every method: from task examples to a loss, an optimiser step, evaluation.

A batch travels like this: task examples (dicts) -> ``encode_candidates`` (decoders: the prompt followed
by each answer candidate, with the positions of the candidate tokens) or ``encode_pairs`` (encoders)
-> ``CandidateLogProbs`` / the classifier -> ``batch_loss``. Decoders compute vocabulary logits only at
the candidate tokens, never over every position. Classification tasks train with cross-entropy over
the candidates' mean log-likelihoods (MeZO's ``train_as_classification``); multiple-choice and
generation tasks train on the log-likelihood of the gold continuation.

The loop (``train``) runs single-process or data-parallel under ``torchrun`` / ``accelerate launch``
through accelerate, writes ``metrics.jsonl`` as it goes, keeps the best adapter by dev metric, stops
early, and checkpoints atomically so that ``resume=True`` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import methods, models, tasks
from .bench import RssSampler, machine
from .zo import ZOEngine, ZOStep, no_decay, query_schedule

# Default learning rates per method, for decoder LMs and for encoders (whose fresh classification head
# needs more): picked on SST-2 with 1000 examples and one epoch (results/compare/). LaMDA on encoders:
# MiniLM dev accuracy 58.8 at 2e-3, 78.2 at 1e-2, chance at 5e-2 (S starts at Sigma_r / scale, so small
# steps barely move it).
DEFAULT_LR = {
    "causal": {"full": 1e-5, "lora": 5e-4, "loretta-rep": 1e-3, "loretta-adp": 1e-3, "lamda": 5e-4,
               "lamda++": 5e-4, "mezo": 1e-6, "mezo-lora": 1e-4, "adazeta": 1e-4},
    "encoder": {"full": 1e-4, "lora": 2e-3, "loretta-rep": 5e-3, "loretta-adp": 5e-3, "lamda": 1e-2,
                "lamda++": 1e-2, "mezo": 1e-6, "mezo-lora": 1e-4, "adazeta": 1e-4},
}


@dataclass
class TrainConfig:
    """Everything a run needs; ``leanft train`` flags and ``--config run.yaml`` keys map onto it."""

    model: str = "smollm2-135m"
    method: str = "loretta-rep"
    task: str = "sst2"  # comma-separated: one adapter on the mixture (or in stages with sequential)
    sequential: bool = False
    num_train: int = 1000
    num_dev: int = 500  # the protocol: 100 for CB and COPA, fewer where a split is smaller
    num_eval: int = 1000
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    max_forwards: int = 0  # zeroth-order budget: stop after this many forward passes (> 0)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 0.0  # 0 = DEFAULT_LR of the method
    weight_decay: float = 0.0
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    eval_every: int = 50
    patience: int = 0  # evaluations without dev improvement before stopping; 0 = never stop early
    eval_before: bool = True
    max_length: int = 256
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    seed: int = 0
    output_dir: str = "runs/latest"
    resume: bool = False
    dtype: str = "float32"
    optimizer: str = "adamw"  # "adamw" or "zo" (implied by the methods mezo, mezo-lora, adazeta)
    zo_eps: float = 1e-3
    zo_queries: int = 1  # queries per step with a fixed schedule
    zo_schedule: str = "auto"  # "fixed", "adazeta", or "auto" (adazeta for the adazeta method)
    zo_alpha: float = 0.85
    zo_beta: float = 0.45
    zo_q_max: int = 20
    zo_blowup: float = 10.0  # roll back when the loss exceeds this multiple of its running mean
    method_options: dict[str, Any] = field(default_factory=dict)  # rank, tt_rank, bottleneck, ...
    # users' own data instead of built-in tasks
    train_file: str | None = None
    eval_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    template: str | None = None
    label_words: list[str] | None = None
    dataset: str | None = None  # a hub dataset name (needs network and the datasets package)
    dataset_config: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------
# From examples to tensors


def encode_candidates(
    task: tasks.Task, examples: list[dict], tokenizer, max_length: int, gold_only: bool = False
) -> dict[str, Any]:
    """Token ids of the prompts and candidates, padded on the right, with every candidate token located.

    Each candidate is a *slot*; each of its tokens is a ``(row, col, target, slot)`` entry: the model's
    prediction at ``col - 1`` of sequence ``row`` is scored against ``target``. When all candidates of
    an example are single tokens (most classification verbalisers), they share one sequence, the
    prompt alone, scored at its last position: the same numbers at a fraction of the compute.
    Otherwise each candidate gets its own ``prompt + candidate`` sequence. Prompts are cut from the
    left so that candidates always fit; generation targets end with EOS so the model learns to stop.
    """
    seqs, rows, cols, targets, slots, first, golds = [], [], [], [], [], [], []
    n_slots = 0
    for ex in examples:
        prompt = tokenizer(task.prompt(ex)).input_ids
        candidates, gold = task.candidates(ex), task.label(ex)
        chosen = [gold] if gold_only else list(range(len(candidates)))
        cand_ids = [tokenizer(candidates[i], add_special_tokens=False).input_ids for i in chosen]
        if task.kind == "generation" and tokenizer.eos_token_id is not None:
            cand_ids = [c + [tokenizer.eos_token_id] for c in cand_ids]
        first.append(n_slots)
        if all(len(c) == 1 for c in cand_ids):
            ids = prompt[-(max_length - 1):]
            for j, c in enumerate(cand_ids):
                rows.append(len(seqs)), cols.append(len(ids)), targets.append(c[0]), slots.append(n_slots + j)
            seqs.append(ids)
        else:
            for j, c in enumerate(cand_ids):
                ids = (prompt + c)[-max_length:]
                n = min(len(c), len(ids) - 1)
                for k in range(len(ids) - n, len(ids)):
                    rows.append(len(seqs)), cols.append(k), targets.append(ids[k]), slots.append(n_slots + j)
                seqs.append(ids)
        n_slots += len(cand_ids)
        golds.append(0 if gold_only else gold)
    first.append(n_slots)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "rows": torch.tensor(rows), "cols": torch.tensor(cols), "targets": torch.tensor(targets),
        "slots": torch.tensor(slots), "first": torch.tensor(first), "gold": torch.tensor(golds), "kind": task.kind,
    }


def encode_pairs(task: tasks.Task, examples: list[dict], tokenizer, max_length: int) -> dict[str, Any]:
    """Encoder classifier inputs: ``(text_a, text_b)`` pairs, labels, and the task's label count."""
    texts = [task.encoder_text(ex) for ex in examples]
    a = [t[0] for t in texts]
    b = [t[1] for t in texts] if texts[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([task.label(ex) for ex in examples]), "num_labels": task.num_labels}


class CandidateLogProbs(nn.Module):
    """Log-probabilities of the candidate tokens only: the LM head runs on those positions alone.

    A module of its own so that data-parallel wrappers (DDP) see the forward that produces the loss.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, rows, cols, targets) -> torch.Tensor:
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = base.get_output_embeddings()(hidden[rows, cols - 1]).float()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def candidate_scores(token_logp: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean log-likelihood of each candidate over its tokens (its score)."""
    n = int(batch["first"][-1])
    total = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], token_logp)
    count = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], torch.ones_like(token_logp))
    return total / count


def forward_loss(net: nn.Module, batch: dict, decoder: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss of one encoded batch, and per example the candidate scores (or class logits)."""
    if decoder:
        token_logp = net(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], batch["targets"])
        scores = candidate_scores(token_logp, batch)
        per_example = [scores[a:b] for a, b in zip(batch["first"][:-1], batch["first"][1:])]
        if batch["kind"] == "classification":
            losses = [nn.functional.cross_entropy(s[None], g[None]) for s, g in zip(per_example, batch["gold"])]
        else:
            losses = [-s[g] for s, g in zip(per_example, batch["gold"])]
        return torch.stack(losses).mean(), per_example
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_labels")}
    logits = net(**inputs).logits[:, : batch["num_labels"]]
    return nn.functional.cross_entropy(logits.float(), batch["labels"]), list(logits)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(net: nn.Module, model: nn.Module, task: tasks.Task, examples: list[dict], tokenizer,
             cfg: TrainConfig, accelerator: Accelerator, decoder: bool) -> dict[str, float]:
    """Task metrics on ``examples`` (sharded over processes, gathered on every rank)."""
    was_training = net.training
    net.eval()
    shard = examples[accelerator.process_index :: accelerator.num_processes]
    preds: list[tuple[int, Any]] = []
    for start in range(0, len(shard), cfg.eval_batch_size):
        chunk = shard[start : start + cfg.eval_batch_size]
        idx = range(accelerator.process_index + start * accelerator.num_processes, len(examples), accelerator.num_processes)
        if task.kind == "generation":
            out = generate(model, task, chunk, tokenizer, cfg, accelerator.device)
        else:
            batch = (encode_candidates(task, chunk, tokenizer, cfg.max_length) if decoder
                     else encode_pairs(task, chunk, tokenizer, cfg.max_length))
            _, scores = forward_loss(net, to_device(batch, accelerator.device), decoder)
            out = [int(s.argmax()) for s in scores]
        preds += list(zip(idx, out))
    preds = sorted(gather_object(preds)) if accelerator.num_processes > 1 else preds
    net.train(was_training)
    values = [p for _, p in preds]
    if task.kind == "generation":
        return tasks.score_generation(values, [task.references(ex) for ex in examples])
    return tasks.classification_metrics(values, [task.label(ex) for ex in examples], task.num_labels)


def generate(model: nn.Module, task: tasks.Task, examples: list[dict], tokenizer, cfg: TrainConfig,
             device: torch.device) -> list[str]:
    """Greedy generation from the prompts (left-padded), cut at the first newline."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer([task.prompt(ex) for ex in examples], return_tensors="pt", padding=True).to(device)
    tokenizer.padding_side = side
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip().split("\n")[0] for t in texts]


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed into place, so a crash never leaves a half
# checkpoint; a `latest` pointer file is replaced atomically after the folder exists.


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes or a resume needs: trainable parameters and the adapter's own buffers
    (e.g. the frozen initial factors of a noise-free start)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PeftModel):  # adapter tensors frozen during training (LaMDA's P_B) count too
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_config[model.active_adapter].peft_type]
        state.update({n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if prefix in n})
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def atomic_dir(target: Path, write) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``target``, replacing an older one only after."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, state: dict) -> None:
    def write(d: Path) -> None:
        save_file(trainable_state(model), str(d / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "numpy": np.random.get_state()}}, d / "optimizer.pt")
        (d / "trainer_state.json").write_text(json.dumps(state, indent=1))

    atomic_dir(out / "checkpoint", write)


def load_checkpoint(out: Path, model: nn.Module, optimizer, scheduler) -> dict:
    ckpt = out / "checkpoint"
    if not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint in {ckpt} (was the run started with this output_dir?)")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in load_file(str(ckpt / "trainable.safetensors")).items():
        tensors[name].data.copy_(tensor)
    extra = torch.load(ckpt / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["torch"])
    random.setstate(extra["rng"]["python"])
    np.random.set_state(extra["rng"]["numpy"])
    return json.loads((ckpt / "trainer_state.json").read_text())


def save_best(out: Path, model: nn.Module, tokenizer, run_info: dict) -> None:
    def write(d: Path) -> None:
        model.save_pretrained(d)
        if not isinstance(model, PeftModel):
            tokenizer.save_pretrained(d)
        (d / "leanft_run.json").write_text(json.dumps(run_info, indent=1))

    atomic_dir(out / "best", write)


# ----------------------------------------------------------------------------------------------------
# The run


def trainable_numel(model: nn.Module) -> int:
    """Parameters that currently train (LaMDA reports its partly frozen P_B itself)."""
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "trainable_counts"):
        return int(tuner.trainable_counts()["total"])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory_mb(device: torch.device, sampler: RssSampler | None) -> tuple[float, str]:
    """Peak since the model was loaded: CUDA max allocated, or the sampled peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return sampler.stop(), "peak RSS after loading"


def load_tasks(cfg: TrainConfig) -> list[tuple[tasks.Task, tasks.Splits]]:
    if cfg.train_file or cfg.dataset:
        if not cfg.text_columns or not cfg.label_column:
            raise ValueError("users' data needs text_columns and label_column (--text-columns, --label-column)")
        kw = dict(text_columns=cfg.text_columns, label_column=cfg.label_column, template=cfg.template,
                  label_words=cfg.label_words)
        if cfg.dataset:
            return [tasks.hub_task(cfg.dataset, config=cfg.dataset_config, num_train=cfg.num_train, num_dev=cfg.num_dev,
                                   num_eval=cfg.num_eval, seed=cfg.seed, **kw)]
        return [tasks.user_task(cfg.train_file, cfg.eval_file, num_dev=cfg.num_dev, seed=cfg.seed, **kw)]
    return [(tasks.get_task(name), tasks.load_splits(name, cfg.num_train, cfg.num_dev, cfg.num_eval, cfg.seed))
            for name in cfg.task.split(",")]


def build_model(cfg: TrainConfig, task_list: list[tasks.Task]):
    """Base model with the method applied; encoders get a head as wide as the widest task."""
    decoder = models.model_kind(cfg.model) == "causal"
    if not decoder and any(t.kind != "classification" for t in task_list):
        bad = [t.name for t in task_list if t.kind != "classification"]
        raise ValueError(f"task(s) {bad} need a decoder LM; {cfg.model} is an encoder")
    dtype = getattr(torch, cfg.dtype)
    num_labels = max(t.num_labels for t in task_list)
    model, tokenizer = models.load_model(cfg.model, num_labels=num_labels, dtype=dtype)
    task_type = "CAUSAL_LM" if decoder else "SEQ_CLS"
    model = methods.apply_method(model, cfg.method, task_type, **cfg.method_options)
    return model, tokenizer, decoder


def train(cfg: TrainConfig) -> dict:
    """Fine-tune, evaluate, and return (and write) the final metrics."""
    cfg.method = methods.resolve_method(cfg.method)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on CPU: gloo under torchrun
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    task_data = load_tasks(cfg)
    task_list = [t for t, _ in task_data]
    model, tokenizer, decoder = build_model(cfg, task_list)
    model.to(accelerator.device)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    sampler = RssSampler() if accelerator.device.type == "cpu" else None
    counts = methods.count_parameters(model)
    net = CandidateLogProbs(model) if decoder else model
    stages = [[i] for i in range(len(task_data))] if cfg.sequential else [list(range(len(task_data)))]
    lr = cfg.lr or DEFAULT_LR["causal" if decoder else "encoder"][cfg.method]

    def eval_all(which: str, upto: int | None = None) -> dict[str, dict[str, float]]:
        names = range(len(task_data)) if upto is None else range(upto + 1)
        return {task_data[i][0].name: evaluate(net, model, task_data[i][0], getattr(task_data[i][1], which),
                                               tokenizer, cfg, accelerator, decoder) for i in names}

    before_file, log = out / "eval_before.json", out / "metrics.jsonl"
    if cfg.resume and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = eval_all("eval") if cfg.eval_before else None
        if main:
            before_file.write_text(json.dumps(before))
            log.unlink(missing_ok=True)
    if main and before:
        print(f"before training: {json.dumps(before)}")
    history = [json.loads(line) for line in log.read_text().splitlines()] if cfg.resume and log.is_file() else []
    stage_results = []
    seen, steps_done, train_time, forwards = 0, 0, 0.0, 0
    for stage_no, stage in enumerate(stages):
        train_set = [(i, ex) for i in stage for ex in task_data[i][1].train]
        dev_tasks = [i for i in stage if task_data[i][1].dev]
        result = run_stage(cfg, accelerator, model, net, tokenizer, decoder, task_data, train_set, dev_tasks,
                           lr, out / (f"stage{stage_no}" if cfg.sequential else ""), log, history, stage_no)
        seen += result["examples"]
        steps_done += result["steps"]
        train_time += result["train_time_s"]
        forwards += result["forwards"]
        if cfg.sequential:
            stage_results.append({"stage": stage_no, "task": task_data[stage[0]][0].name,
                                  "eval": eval_all("eval", upto=stage[0])})
            if main:
                print(f"after stage {stage_no} ({task_data[stage[0]][0].name}): {json.dumps(stage_results[-1]['eval'])}")
    after = stage_results[-1]["eval"] if cfg.sequential else eval_all("eval")
    mem, mem_kind = peak_memory_mb(accelerator.device, sampler)
    metrics = {
        "model": cfg.model, "method": cfg.method, "tasks": [t.name for t in task_list], "eval": after,
        "eval_before": before, **counts, "steps": steps_done, "examples_seen": seen, "forward_passes": forwards,
        "parameter_updates": sum(h.get("updated_params", 0) for h in history),
        "trainable_at_end": next((h["updated_params"] for h in reversed(history) if "updated_params" in h), 0),
        "peak_memory_mb": round(mem, 1), "peak_memory_kind": mem_kind, "train_time_s": round(train_time, 2),
        "time_per_step_s": round(train_time / max(steps_done, 1), 3),
        "examples_per_s": round(seen / max(train_time, 1e-9), 2),
        "wall_time_s": round(time.perf_counter() - t_start, 2), "device": str(accelerator.device),
        "machine": machine(),
        "num_processes": accelerator.num_processes, "lr": lr, "config": asdict(cfg),
    }
    if cfg.sequential:
        metrics["stages"] = stage_results
        metrics["forgetting"] = forgetting(stage_results)
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_curves(history, out / "curves.png")
    accelerator.wait_for_everyone()
    return metrics


def forgetting(stage_results: list[dict]) -> dict[str, float]:
    """Per task: best main metric seen after any stage minus the metric after the last stage."""
    final = stage_results[-1]["eval"]
    out = {}
    for name, final_metrics in final.items():
        key = next(iter(final_metrics))
        best = max(s["eval"][name][key] for s in stage_results if name in s["eval"])
        out[name] = round(best - final_metrics[key], 2)
    return out


def task_batches(items: list[tuple[int, dict]], task_data, tokenizer, cfg: TrainConfig, decoder: bool,
                 device: torch.device) -> list[tuple[int, dict]]:
    """A (possibly mixed-task) list of examples as encoded batches, one per task: ``(n_examples, batch)``."""
    out = []
    for ti in sorted({ti for ti, _ in items}):
        exs = [ex for t, ex in items if t == ti]
        task = task_data[ti][0]
        batch = (encode_candidates(task, exs, tokenizer, cfg.max_length, gold_only=task.kind != "classification")
                 if decoder else encode_pairs(task, exs, tokenizer, cfg.max_length))
        out.append((len(exs), to_device(batch, device)))
    return out


def mean_loss(net: nn.Module, batches: list[tuple[int, dict]], decoder: bool) -> torch.Tensor:
    """Example-weighted mean loss over the per-task batches of one micro-batch."""
    total = sum(n for n, _ in batches)
    return sum(forward_loss(net, b, decoder)[0] * n / total for n, b in batches)


class FirstOrder:
    """AdamW (decoupled weight decay, none on biases and norms) with a schedule; DDP through accelerate."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model: nn.Module, net: nn.Module, lr: float,
                 total_steps: int, decoder: bool) -> None:
        groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and no_decay(n) == nd],
                   "weight_decay": 0.0 if nd else cfg.weight_decay} for nd in (False, True)]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        self.scheduler = get_scheduler(cfg.scheduler, optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
        self.net, self.optimizer = accelerator.prepare(net, optimizer)
        self.cfg, self.accelerator, self.model, self.decoder = cfg, accelerator, model, decoder
        self.total_steps, self.shard = total_steps, True  # each process trains on its slice of the global batch

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, step: int, epoch: int, micro_batches: list[list[tuple[int, dict]]]) -> dict:
        self.net.train()
        loss_sum, n_sum = 0.0, 0
        for batches in micro_batches:
            loss = mean_loss(self.net, batches, self.decoder)
            if not torch.isfinite(loss.detach()):
                return {"loss": float(loss)}
            self.accelerator.backward(loss / len(micro_batches))
            n = sum(n for n, _ in batches)
            loss_sum, n_sum = loss_sum + float(loss.detach()) * n, n_sum + n
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        updated = trainable_numel(self.model)  # parameters this step changed
        tuner = getattr(self.model, "base_model", None)
        if hasattr(tuner, "update_freezing"):  # LaMDA: freeze P_B gradually by the schedule
            tuner.update_freezing(step + 1, self.total_steps)
        return {"loss": loss_sum / max(n_sum, 1), "updated_params": updated}

    def save(self, out: Path, state: dict) -> None:
        save_checkpoint(out, self.model, self.optimizer, self.scheduler, state)

    def resume(self, out: Path) -> dict:
        state = load_checkpoint(out, self.model, self.optimizer, self.scheduler)
        tuner = getattr(self.model, "base_model", None)
        if hasattr(tuner, "update_freezing"):  # re-apply the freezing reached at the checkpoint
            tuner.update_freezing(state["step"], self.total_steps)
        return state


class ZerothOrder:
    """SPSA through ``zo.ZOEngine``: forward passes only, every process on the same batch, queries split.

    Its checkpoint is the trainable start state plus one line per step (seeds, projected gradients,
    lr) in ``zo_log.jsonl``; resuming replays the log to the exact parameters.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model: nn.Module, net: nn.Module, lr: float,
                 total_steps: int, decoder: bool, out: Path, resuming: bool) -> None:
        if cfg.grad_accum != 1:
            raise ValueError("zeroth-order training takes one batch per step: use --batch-size, not --grad-accum")
        self.engine = ZOEngine(model, eps=cfg.zo_eps, weight_decay=cfg.weight_decay, seed=cfg.seed,
                               blowup=cfg.zo_blowup)
        self.dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)  # carries the lr schedule
        self.scheduler = get_scheduler(cfg.scheduler, self.dummy, int(cfg.warmup_ratio * total_steps), total_steps)
        self.cfg, self.model, self.net, self.main, self.decoder = cfg, model, net, accelerator.is_main_process, decoder
        self.log, self.start = out / "zo_log.jsonl", out / "zo_start.safetensors"
        self.shard, self.forwards = False, 0  # forward passes spent, to end exactly on cfg.max_forwards
        if cfg.max_forwards % 2:
            raise ValueError(f"--max-forwards {cfg.max_forwards} is odd: each zeroth-order query costs 2 forward "
                             "passes, so only an even budget can be spent exactly")
        if self.main and not resuming:
            save_file(trainable_state(model), str(self.start))
            self.log.write_text("")
        accelerator.wait_for_everyone()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def queries(self, epoch: int) -> int:
        """The schedule's query count, cut on the last step so the run spends exactly ``max_forwards``."""
        c = self.cfg
        schedule = c.zo_schedule if c.zo_schedule != "auto" else ("adazeta" if c.method == "adazeta" else "fixed")
        q = query_schedule(epoch, c.zo_alpha, c.zo_beta, c.zo_q_max) if schedule == "adazeta" else c.zo_queries
        return min(q, (c.max_forwards - self.forwards) // 2) if c.max_forwards else q

    def step(self, step: int, epoch: int, micro_batches: list[list[tuple[int, dict]]]) -> dict:
        self.net.eval()  # dropout off during the perturbed forwards
        loss_fn = lambda: float(mean_loss(self.net, micro_batches[0], self.decoder))  # noqa: E731
        record = self.engine.step(step, loss_fn, self.queries(epoch), self.lr())
        self.forwards += 2 * len(record.seeds)
        self.dummy.step()
        self.scheduler.step()
        if self.main:
            with open(self.log, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return {"loss": record.loss, "queries": len(record.seeds), "projected_grad": float(np.mean(record.grads)),
                "updated_params": 0 if record.rolled_back else self.engine.numel,
                **({"rolled_back": True} if record.rolled_back else {})}

    def save(self, out: Path, state: dict) -> None:
        atomic_dir(out / "checkpoint", lambda d: (d / "trainer_state.json").write_text(json.dumps(state, indent=1)))

    def resume(self, out: Path) -> dict:
        state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
        self.forwards = state["forwards"]
        tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        for name, tensor in load_file(str(self.start)).items():
            tensors[name].data.copy_(tensor)
        lines = [line for line in self.log.read_text().splitlines() if line.strip()][: state["step"]]
        records = [ZOStep(**json.loads(line)) for line in lines]
        self.engine.replay(records)
        for _ in records:
            self.dummy.step()
            self.scheduler.step()
        if self.main:  # steps after the checkpoint are redone, identically
            self.log.write_text("".join(line + "\n" for line in lines))
        return state


def run_stage(cfg, accelerator, model, net, tokenizer, decoder, task_data, train_set, dev_tasks, lr, out, log,
              history, stage_no) -> dict:
    """Train on ``train_set`` (pairs of task index and example); returns what was done.

    ``history`` holds the logged rows of earlier stages and, on resume, of this stage up to its
    checkpoint; rows logged after the checkpoint (lost work) are dropped from it and from the log.
    """
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    zo = cfg.optimizer == "zo" or cfg.method in methods.ZO_METHODS
    micro = cfg.batch_size * (1 if zo else world)  # examples per micro-step over all processes
    per_epoch = max(1, math.ceil(len(train_set) / micro))
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))
    out.mkdir(parents=True, exist_ok=True)
    resuming = cfg.resume and (out / "checkpoint" / "trainer_state.json").is_file()
    updater = (ZerothOrder(cfg, accelerator, model, net, lr, total_steps, decoder, out, resuming) if zo
               else FirstOrder(cfg, accelerator, model, net, lr, total_steps, decoder))
    state = {"step": 0, "best": None, "bad_evals": 0, "examples": 0, "train_time_s": 0.0, "stopped": False,
             "forwards": 0}
    if resuming:
        state = updater.resume(out)
        if main:
            print(f"resumed from {out / 'checkpoint'} at step {state['step']}")
    if cfg.resume:  # rows logged after the checkpoint (or without one) are work to redo
        history[:] = [h for h in history if h["stage"] < stage_no or (h["stage"] == stage_no and h["step"] <= state["step"])]
        if main:
            log.write_text("".join(json.dumps(h) + "\n" for h in history))
    dev_names = [task_data[i][0].name for i in dev_tasks]
    shown = min(total_steps, math.ceil(cfg.max_forwards / 2)) if zo and cfg.max_forwards else total_steps  # Q=1 steps
    bar = tqdm(total=shown, initial=state["step"], disable=not main, desc="train", dynamic_ncols=True)
    orders: dict[int, list[int]] = {}
    while state["step"] < total_steps and not state["stopped"]:
        t0 = time.perf_counter()
        micro_batches, epoch = [], 0
        for m in range(cfg.grad_accum):
            k = state["step"] * cfg.grad_accum + m  # global micro-batch index
            epoch, pos = divmod(k, per_epoch)
            if epoch not in orders:  # a seeded order per epoch, cycled to whole global batches
                perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
                orders = {epoch: (perm.tolist() * 2)[: per_epoch * micro]}
            idx = orders[epoch][pos * micro : (pos + 1) * micro]
            if updater.shard:
                idx = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            micro_batches.append(task_batches([train_set[i] for i in idx], task_data, tokenizer, cfg, decoder,
                                              accelerator.device))
        lr_now = updater.lr()
        row = {"stage": stage_no, "step": state["step"] + 1, "lr": lr_now,
               **updater.step(state["step"], epoch, micro_batches)}
        if not math.isfinite(row["loss"]) and not zo:
            raise FloatingPointError(
                f"the training loss became {row['loss']} at step {state['step']} (lr {lr_now:.2e}); "
                f"the last good checkpoint is in {out / 'checkpoint'}: lower the learning rate and resume")
        state["step"] += 1
        state["forwards"] = state.get("forwards", 0) + (2 * row["queries"] if zo else len(micro_batches))
        row["forwards"] = state["forwards"]
        if zo and cfg.max_forwards and state["forwards"] >= cfg.max_forwards:
            total_steps = state["step"]  # budget spent: this is the last step (evaluate, save)
        dt = time.perf_counter() - t0
        n_all = sum(n for batches in micro_batches for n, _ in batches) * (1 if zo else world)
        state["examples"] += n_all
        state["train_time_s"] += dt
        row["examples_per_s"] = n_all / dt
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr_now:.1e}", ex_s=f"{row['examples_per_s']:.1f}",
                        **({"q": row["queries"]} if zo else {}))
        if row.get("rolled_back") and main:
            bar.write(f"step {state['step']}: loss {row['loss']} diverged; rolled back and halved the learning rate")
        evaluate_now = dev_tasks and (state["step"] % cfg.eval_every == 0 or state["step"] == total_steps)
        if evaluate_now:
            dev = {task_data[i][0].name: evaluate(updater.net, model, task_data[i][0], task_data[i][1].dev, tokenizer,
                                                  cfg, accelerator, decoder) for i in dev_tasks}
            score = sum(next(iter(m.values())) for m in dev.values()) / len(dev)
            row["dev"] = dev
            if state["best"] is None or score > state["best"]:
                state["best"], state["bad_evals"] = score, 0
                if main:
                    save_best(out, model, tokenizer, {"model": cfg.model, "method": cfg.method, "tasks": dev_names,
                                                      "step": state["step"], "dev": dev})
            else:
                state["bad_evals"] += 1
                state["stopped"] = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
            if main:
                bar.write(f"step {state['step']}: dev {json.dumps(dev)}" + (" (early stop)" if state["stopped"] else ""))
        if main:
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            if state["step"] % cfg.eval_every == 0 or state["step"] == total_steps:
                updater.save(out, state)
        accelerator.wait_for_everyone()
    bar.close()
    if state["best"] is not None:  # evaluate the best adapter, not the last one
        load_best_weights(out / "best", model)
    return {"steps": state["step"], "examples": state["examples"], "train_time_s": state["train_time_s"],
            "forwards": state["forwards"]}


def evaluate_saved(adapter_dir: str | Path, cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """Evaluate a saved ``best/`` folder (a PEFT adapter, or a fully fine-tuned model) on cfg's tasks."""
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / "leanft_run.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a leanft run output (no leanft_run.json)")
    info = json.loads(info_file.read_text())
    cfg.model, cfg.method = info["model"], info["method"]
    if not (cfg.train_file or cfg.dataset or cfg.task):
        cfg.task = ",".join(info["tasks"])
    task_data = load_tasks(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on CPU: gloo under torchrun
    decoder = models.model_kind(cfg.model) == "causal"
    num_labels = max(t.num_labels for t, _ in task_data)
    if (adapter_dir / "adapter_config.json").is_file():
        base, tokenizer = models.load_model(cfg.model, num_labels=num_labels, dtype=getattr(torch, cfg.dtype))
        model = PeftModel.from_pretrained(base, adapter_dir)
    else:
        model, tokenizer = models.load_model(str(adapter_dir), num_labels=num_labels, dtype=getattr(torch, cfg.dtype),
                                             task="causal" if decoder else "seq_cls")
    model = model.to(accelerator.device).eval()
    net = CandidateLogProbs(model) if decoder else model
    return {t.name: evaluate(net, model, t, splits.eval, tokenizer, cfg, accelerator, decoder) for t, splits in task_data}


def load_best_weights(best: Path, model: nn.Module) -> None:
    """Put the kept best trainable weights back into ``model``."""
    if isinstance(model, PeftModel):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(best)))
    else:
        files = sorted(best.glob("*.safetensors"))
        model.load_state_dict({k: v for f in files for k, v in load_file(str(f)).items()}, strict=False)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and dev metric against steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    ax[0].plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax[0].plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax[0].legend()
    ax[0].set(xlabel="step", ylabel="training loss", title="loss")
    dev = [h for h in history if "dev" in h]
    for name in dict.fromkeys(n for h in dev for n in h["dev"]):  # every task that had a dev set, in order
        rows = [h for h in dev if name in h["dev"]]
        key = next(iter(rows[0]["dev"][name]))
        ax[1].plot([h["step"] for h in rows], [h["dev"][name][key] for h in rows], marker="o", label=f"{name} {key}")
    ax[1].set(xlabel="step", ylabel="dev metric", title="dev")
    if dev:
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
