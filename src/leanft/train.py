"""The training loop: every method, one loop, read top to bottom.

A run (``train``) loads its tasks (``tasks.load_tasks``) and the adapted model (``leanft.loading``),
evaluates before training, then trains in one stage (a mixture of tasks) or one stage per task
(``sequential``). In a stage, each step:

1. takes the next ``batch_size`` examples of a seeded per-epoch order (``grad_accum`` micro-batches;
   under data-parallel first-order training each process takes its slice of the global batch);
2. encodes them (``tasks.collate.task_batches``: prompt + answer candidates with the positions of the
   candidate tokens, or encoder text pairs), from token ids made once per example and run
   (``Loaded.tokenized``; the truncation report makes them before training starts);
3. has the updater (``leanft.optim``) compute the loss (``objectives.mean_loss``: cross-entropy over the
   candidates' mean log-likelihoods, or the gold continuation's negative log-likelihood) and update.
   First-order: forward and backward of each micro-batch (gradients averaged, synchronised by DDP),
   one AdamW step (weight decay on matrices and TT cores only), the lr schedule, then the method's own
   schedule (LaMDA freezes P_B's columns). Zeroth-order (``leanft.zo``): for each of Q queries, the loss
   at ``theta + eps z`` and ``theta - eps z`` with ``z`` regenerated from a seed, then
   ``theta -= lr * mean_q((l+ - l-) / (2 eps) z_q)`` (MeZO's sgd; ``--zo-optimizer`` picks another update,
   ``leanft.zo.optimizers``): forward passes only, no gradients;
4. logs a row to ``metrics.jsonl``; every ``eval_every`` steps evaluates on dev (``leanft.evaluate``),
   keeps the best adapter in ``best/``, stops early after ``patience`` evaluations without progress; at
   evaluations and every ``save_every`` steps or minutes it checkpoints (``leanft.runfolder``, which owns
   the output folder: the updater's ``state_dict`` and tensors, written atomically) so that ``resume``
   continues exactly where it stopped.

A non-finite first-order loss on any process stops every process with the last good checkpoint kept; a
zeroth-order step that diverges is rolled back by the engine. The best adapter is evaluated at the end.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import methods, objectives, optim, runfolder, tasks
from .config import DEFAULT_LR, TrainConfig, save_cadence
from .evaluate import evaluate, report_truncation
from .loading import Loaded, accelerator, load
from .runfolder import claim_output, clear_output, plot_curves, predictions_file, run_data
from .stops import Interrupted, StopSignals
from .system import machine, peak_memory
from .tasks import load_tasks
from .tasks.collate import task_batches
from .zo import make_optimizer, query_schedule

__all__ = ["Interrupted", "TrainConfig", "train"]


@dataclass
class Run:
    """What every stage of a run shares."""

    loaded: Loaded
    task_data: list[tuple[tasks.Task, tasks.Splits]]
    lr: float
    log: Path
    stop: StopSignals
    history: list[dict] = field(default_factory=list)  # rows of metrics.jsonl so far

    @property
    def cfg(self) -> TrainConfig:
        return self.loaded.cfg

    @property
    def main(self) -> bool:
        return self.loaded.accelerator.is_main_process

    def evaluate(self, split: str, task_indices, net=None, save: bool = False) -> dict[str, dict[str, float]]:
        """Metrics per task; with ``save``, each task's predictions too, in ``predictions-<task>-<split>.jsonl``."""
        loaded = self.loaded if net is None else replace(self.loaded, net=net)
        return {t.name: evaluate(loaded, t, getattr(s, split),
                                 predictions_file(self.log.parent, t.name, split) if save else None)
                for t, s in (self.task_data[i] for i in task_indices)}


def train(cfg: TrainConfig) -> dict:
    """Fine-tune, evaluate, and return (and write) the final metrics."""
    cfg.method = methods.resolve_method(cfg.method)
    if cfg.method == "full" and not cfg.zeroth_order and cfg.dtype != "float32":
        raise ValueError(
            f"full fine-tuning with --dtype {cfg.dtype} is refused: it would keep float32 master weights and compute "
            f"with {cfg.dtype} copies of them, and updates as small as full fine-tuning's stay below {cfg.dtype}'s "
            "resolution, so the model that trains is not the one saved (measured on SmolLM2-135M SST-2: 7 points "
            "below float32, the saved weights at chance in float32; BENCHMARKS.md section 6). Use --dtype float32 "
            f"for full fine-tuning, an adapter method in {cfg.dtype}, or --method mezo, which trains {cfg.dtype} "
            "weights themselves")
    if cfg.zeroth_order and cfg.method in ("lamda", "lamda++"):
        raise ValueError(
            f"{cfg.method} with --optimizer zo is refused: LaMDA freezes P_B's columns on a schedule of optimiser "
            "steps, which zeroth-order training (it perturbs every trainable tensor whole) does not follow. Use "
            f"--optimizer adamw for {cfg.method}, or --method mezo-lora or adazeta for zeroth-order training")
    accel = accelerator()
    out = Path(cfg.output_dir)
    claim_output(out, cfg, accel)
    with StopSignals(accel) as stop:
        return run_all(cfg, accel, out, stop)


def run_all(cfg: TrainConfig, accel, out: Path, stop: StopSignals) -> dict:
    """Every stage of the run and the evaluations around them, with ``out`` claimed and the signals handled."""
    t_start = time.perf_counter()
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    task_data = load_tasks(cfg)
    task_list = [t for t, _ in task_data]
    if accel.is_main_process:
        print("\n".join(tasks.rows_used(t.name, s) for t, s in task_data))
    loaded = load(cfg, task_list, accel)
    truncated = report_truncation(loaded, task_data)  # printed once; refuses a max_length beyond the model's context
    memory = peak_memory(accel.device)
    counts = methods.count_parameters(loaded.model)
    if accel.is_main_process:
        print(f"{cfg.method} adapts {methods.describe_targets(loaded.model)}: {counts['trainable']:,} trainable "
              f"parameters of {counts['total']:,}")
        if cfg.zeroth_order and not loaded.decoder:
            print("note: zeroth-order training of an encoder's new classification head is slow to leave chance: on "
                  "MiniLM SST-2 it learned only the class prior in 3,006 forward passes (BENCHMARKS.md section 14). "
                  "Train encoders first-order (--method lora), or use a decoder, whose answers are label words its "
                  "pretrained head already scores")
    lr = cfg.lr or DEFAULT_LR["causal" if loaded.decoder else "encoder"][cfg.method]
    run = Run(loaded, task_data, lr, out / "metrics.jsonl", stop)
    every = range(len(task_data))
    if run.main and cfg.overwrite:
        clear_output(out)

    before_file = out / "eval_before.json"
    if cfg.resume and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = run.evaluate("eval", every) if cfg.eval_before else None
        if run.main:
            before_file.write_text(json.dumps(before))
            run.log.unlink(missing_ok=True)
    if run.main and before:
        print(f"before training: {json.dumps(before)}")
    if cfg.resume and run.log.is_file():
        run.history = [json.loads(line) for line in run.log.read_text().splitlines()]

    stages = [[i] for i in every] if cfg.sequential else [list(every)]
    done = {"steps": 0, "examples": 0, "train_time_s": 0.0, "forwards": 0}
    stage_results = []
    for stage_no, stage in enumerate(stages):
        stage_out = out / (f"stage{stage_no}" if cfg.sequential else "")
        result = run_stage(run, stage_no, stage, stage_out)
        signum, _ = stop.agreed()  # the stage's last step was checkpointed
        if signum:
            raise Interrupted(signum, result["steps"], stage_out)
        done = {k: done[k] + result[k] for k in done}
        if cfg.sequential:
            name = task_data[stage[0]][0].name
            evals = run.evaluate("eval", range(stage[0] + 1), save=True)
            stage_results.append({"stage": stage_no, "task": name, "eval": evals})
            if run.main:
                print(f"after stage {stage_no} ({name}): {json.dumps(stage_results[-1]['eval'])}")
    after = stage_results[-1]["eval"] if cfg.sequential else run.evaluate("eval", every, save=True)

    mem, mem_kind = memory()
    history = run.history
    metrics = {
        "model": cfg.model, "method": cfg.method, "tasks": [t.name for t in task_list], "eval": after,
        "rows": {t.name: {"train": len(s.train), "dev": len(s.dev), "eval": len(s.eval), "of": s.pool}
                 for t, s in task_data},
        "truncated": truncated, "eval_before": before, **counts, "steps": done["steps"],
        "examples_seen": done["examples"],
        "forward_passes": done["forwards"], "parameter_updates": sum(h.get("updated_params", 0) for h in history),
        "trainable_at_end": next((h["updated_params"] for h in reversed(history) if "updated_params" in h), 0),
        "peak_memory_mb": round(mem, 1), "peak_memory_kind": mem_kind, "train_time_s": round(done["train_time_s"], 2),
        "time_per_step_s": round(done["train_time_s"] / max(done["steps"], 1), 3),
        "examples_per_s": round(done["examples"] / max(done["train_time_s"], 1e-9), 2),
        "wall_time_s": round(time.perf_counter() - t_start, 2), "device": str(accel.device),
        "machine": machine(), "num_processes": accel.num_processes, "lr": lr, "config": asdict(cfg),
    }
    if cfg.sequential:
        metrics["stages"] = stage_results
        metrics["forgetting"] = forgetting(stage_results)
    if run.main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_curves(history, out / "curves.png")
    accel.wait_for_everyone()
    return metrics


def make_updater(run: Run, total_steps: int, stage_no: int = 0):
    """AdamW, or SPSA for zeroth-order methods (``--optimizer zo``), minimising ``objectives.mean_loss``."""
    cfg, loaded = run.cfg, run.loaded
    objective = lambda net, batches: objectives.mean_loss(net, batches, loaded.decoder)  # noqa: E731
    common = dict(scheduler=cfg.scheduler, warmup_steps=int(cfg.warmup_ratio * total_steps), total_steps=total_steps,
                  weight_decay=cfg.weight_decay, autocast=loaded.precision.autocast)
    if not cfg.zeroth_order:
        return optim.FirstOrder(loaded.model, loaded.net, objective, run.lr, accelerator=loaded.accelerator,
                                scaler=loaded.precision.scaler(), max_grad_norm=cfg.max_grad_norm, **common)
    if cfg.grad_accum != 1:
        raise ValueError("zeroth-order training takes one batch per step: use --batch-size, not --grad-accum")
    schedule = cfg.zo_schedule if cfg.zo_schedule != "auto" else ("adazeta" if cfg.method == "adazeta" else "fixed")
    queries = (partial(query_schedule, alpha=cfg.zo_alpha, beta=cfg.zo_beta, q_max=cfg.zo_q_max)
               if schedule == "adazeta" else lambda epoch: cfg.zo_queries)
    updater = optim.ZerothOrder(loaded.model, loaded.net, objective, run.lr, eps=cfg.zo_eps, seed=cfg.seed,
                                blowup=cfg.zo_blowup, recover=cfg.zo_recover,
                                max_rollbacks=cfg.zo_max_rollbacks, queries=queries, max_forwards=cfg.max_forwards,
                                stage=stage_no, optimizer=make_optimizer(cfg.zo_optimizer, **cfg.zo_options()),
                                **common)
    return updater


def run_stage(run: Run, stage_no: int, stage: list[int], out: Path) -> dict:
    """Train on the tasks of ``stage``; returns the steps, examples, time and forward passes it took.

    On resume, rows of ``run.history`` logged after this stage's checkpoint (lost work) are dropped
    from it and from the log: those steps are redone.
    """
    cfg, loaded = run.cfg, run.loaded
    world, rank = loaded.accelerator.num_processes, loaded.accelerator.process_index
    train_set = [(i, ex) for i in stage for ex in run.task_data[i][1].train]
    dev_tasks = [i for i in stage if run.task_data[i][1].dev]
    zo = cfg.zeroth_order
    micro = cfg.batch_size * (1 if zo else world)  # examples per micro-step over all processes
    per_epoch = max(1, math.ceil(len(train_set) / micro))
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))
    out.mkdir(parents=True, exist_ok=True)
    resuming = cfg.resume and runfolder.has_checkpoint(out)
    if cfg.resume and not resuming and run.main:
        print(f"--resume: no checkpoint in {out}; this stage starts at step 0")
    updater = make_updater(run, total_steps, stage_no)
    state = {"step": 0, "best": None, "bad_evals": 0, "examples": 0, "train_time_s": 0.0, "stopped": False}
    if resuming:
        state = runfolder.resume(out, updater, loaded.accelerator)
        if run.main:
            print(f"resumed from {out / 'checkpoint'} at step {state['step']}")
    if cfg.resume:
        run.history[:] = [h for h in run.history
                          if h["stage"] < stage_no or (h["stage"] == stage_no and h["step"] <= state["step"])]
        if run.main:
            run.log.write_text("".join(json.dumps(h) + "\n" for h in run.history))
    dev_names = [run.task_data[i][0].name for i in dev_tasks]
    shown = min(total_steps, math.ceil(cfg.max_forwards / 2)) if zo and cfg.max_forwards else total_steps  # Q=1 steps
    bar = tqdm(total=shown, initial=state["step"], disable=not run.main, desc="train", dynamic_ncols=True)
    orders: dict[int, list[int]] = {}
    save_steps, save_seconds = save_cadence(cfg.save_every)
    last_save = time.perf_counter()
    while state["step"] < total_steps and not state["stopped"]:
        t0 = time.perf_counter()
        # 1-2. the step's micro-batches, encoded
        micro_batches, epoch = [], 0
        for m in range(cfg.grad_accum):
            k = state["step"] * cfg.grad_accum + m  # global micro-batch index
            epoch, pos = divmod(k, per_epoch)
            if epoch not in orders:  # a seeded order per epoch, cycled to whole global batches
                seeded = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
                perm = torch.randperm(len(train_set), generator=seeded)
                orders = {epoch: (perm.tolist() * 2)[: per_epoch * micro]}
            idx = orders[epoch][pos * micro : (pos + 1) * micro]
            if updater.shard:
                idx = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            micro_batches.append(task_batches([train_set[i] for i in idx], [t for t, _ in run.task_data],
                                              loaded.tokenized, loaded.device))
        # 3. loss and update
        lr_now = updater.lr()
        row = {"stage": stage_no, "step": state["step"] + 1, "lr": lr_now,
               **updater.step(state["step"], epoch, micro_batches)}
        if row.get("nonfinite"):
            kept = (f"the last good checkpoint is in {out / 'checkpoint'}" if runfolder.has_checkpoint(out)
                    else "no checkpoint was written yet")
            if row["nonfinite"] == "gradient":  # all-reduced: every process holds the same gradient
                what = (f"the gradient became non-finite (norm {row['grad_norm']}) at step {state['step']} with a "
                        f"finite training loss {row['loss']:.6g} (lr {lr_now:.2e}); no update was made")
            else:
                where = "" if world == 1 else f" on process(es) {sorted(row['nonfinite'])} of {world}"
                what = (f"the training loss became {row['loss']} at step {state['step']}{where} (micro-batch "
                        f"{row['micro_batch']}, lr {lr_now:.2e})")
            raise FloatingPointError(f"{what}; every process stops; {kept}: lower the learning rate and resume")
        # 4. bookkeeping, evaluation, checkpoint
        state["step"] += 1
        row["forwards"] = updater.forwards  # the run's so far (the updater counts them)
        if zo and not updater.fits():  # no step fits in what is left of --max-forwards
            total_steps = state["step"]  # budget spent: this is the last step (evaluate, save)
        dt = time.perf_counter() - t0
        n_all = sum(n for batches in micro_batches for n, _ in batches) * (1 if zo else world)
        state["examples"] += n_all
        state["train_time_s"] += dt
        row["examples_per_s"] = n_all / dt
        run.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr_now:.1e}", ex_s=f"{row['examples_per_s']:.1f}",
                        **({"q": row["queries"]} if zo else {}))
        if row.get("rolled_back") and run.main:
            bar.write(f"step {state['step']}: diverged ({row['diverged']}; loss {row['loss']:.6g}); rolled back and "
                      "halved the learning rate")
        at_eval = state["step"] % cfg.eval_every == 0 or state["step"] == total_steps
        if dev_tasks and at_eval:
            dev = run.evaluate("dev", dev_tasks, net=updater.net)
            row["dev"] = dev
            score = sum(next(iter(m.values())) for m in dev.values()) / len(dev)
            if state["best"] is None or score > state["best"]:
                state["best"], state["bad_evals"] = score, 0
                if run.main:
                    runfolder.save_best(out, loaded.model, loaded.tokenizer,
                                         {"model": cfg.model, "method": cfg.method, "tasks": dev_names,
                                          "step": state["step"], "dev": dev, "data": run_data(cfg, stage)})
            else:
                state["bad_evals"] += 1
                state["stopped"] = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
            if run.main:
                stop = " (early stop)" if state["stopped"] else ""
                bar.write(f"step {state['step']}: dev {json.dumps(dev)}{stop}")
        clock = bool(save_seconds) and time.perf_counter() - last_save >= save_seconds
        signum, clock = run.stop.agreed(clock)  # SIGINT/SIGTERM on any process: all checkpoint this step and stop
        if run.main:
            with open(run.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        due = signum or at_eval or (save_steps and state["step"] % save_steps == 0) or clock
        if due:  # every process takes part: each one's random states go into the checkpoint
            runfolder.save_checkpoint(out, updater, state, loaded.accelerator)
            last_save = time.perf_counter()
        loaded.accelerator.wait_for_everyone()
        if signum:
            bar.close()
            raise Interrupted(signum, state["step"], out)
    bar.close()
    if state["best"] is not None:  # evaluate the best adapter, not the last one
        runfolder.load_best(out, loaded.model)
    return {"steps": state["step"], "examples": state["examples"], "train_time_s": state["train_time_s"],
            "forwards": updater.forwards}


def forgetting(stage_results: list[dict]) -> dict[str, float]:
    """Per task: best main metric seen after any stage minus the metric after the last stage."""
    final = stage_results[-1]["eval"]
    out = {}
    for name, final_metrics in final.items():
        key = next(iter(final_metrics))
        best = max(s["eval"][name][key] for s in stage_results if name in s["eval"])
        out[name] = round(best - final_metrics[key], 2)
    return out
