"""The output folder of a run, and the one module that writes and reads it.

It is claimed before anything loads (a fresh run never silently replaces another; ``--overwrite`` deletes
the old run's files first). During training it holds the checkpoint (``save_checkpoint``/``resume``: the
trainable tensors, the updater's ``state_dict``, each process's RNG states where the updater draws random
numbers, written atomically by ``leanft.checkpoint``) and the best adapter (``save_best``/``load_best``),
whose ``leanft_run.json`` keeps the data options so that ``leanft eval`` reruns the run's evaluation."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch.distributed as dist
from accelerate.utils import broadcast_object_list
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file
from torch import nn

from . import checkpoint, tasks
from .config import TrainConfig

# What a run writes in its output folder; a fresh run over any of them is refused (or, with overwrite, deletes them)
RUN_FILES = ("checkpoint", "best", "metrics.json", "metrics.jsonl", "eval_before.json", "curves.png", "zo_log.jsonl",
             "zo_start.safetensors", "zo_meta.json", "stage[0-9]*", ".checkpoint.*", ".best.*", ".zo_*",
             "predictions-*.jsonl")
# The options that chose and encoded a run's data: best/leanft_run.json keeps them for `leanft eval`
# where a run's data comes from: naming another source at eval drops all of these
DATA_SOURCE = ("task", "train_file", "eval_file", "dataset", "dataset_config", "task_name")
DATA_FIELDS = (*DATA_SOURCE, "text_columns", "label_column", "template", "label_words", "prompt_column", "completion_column", "messages_column",
               "num_train", "num_dev", "num_eval", "seed", "max_length", "max_new_tokens", "dtype")


def claim_output(out: Path, cfg: TrainConfig, accel) -> None:
    """Check, before anything is loaded, that ``out`` is a writable folder and, unless resuming, holds no other
    run, which is refused without ``overwrite`` (``clear_output`` then deletes it). The main process decides and
    tells the others: every process goes on, or every one stops."""
    refusal = None
    if accel.is_main_process:
        try:
            refusal = _claim(out, cfg)
        except OSError as e:
            refusal = f"cannot use --output-dir {out}: {e}"
    if accel.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise ValueError(refusal)


def _claim(out: Path, cfg: TrainConfig) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--output-dir {out} is a file, not a folder: choose another --output-dir"
    out.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out).close()  # writable: fail now, not after loading and evaluating
    found = run_files(out)
    if cfg.resume or cfg.overwrite or not found:
        return None
    return (f"{out} holds another run ({', '.join(p.name for p in found)}), which a fresh run would replace. To "
            f"continue it: leanft train --resume --output-dir {out} with the options it was started with; to "
            "delete it and start afresh: add --overwrite; or choose another --output-dir")


def run_files(out: Path) -> list[Path]:
    return [p for pattern in RUN_FILES for p in sorted(out.glob(pattern))]


def clear_output(out: Path) -> None:
    """``overwrite``: delete the old run's files once the new run's data and model have loaded (a typo in them
    loses nothing) and before it writes anything, so that a later resume can never mix the two runs."""
    for p in run_files(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_data(cfg: TrainConfig, stage: list[int]) -> dict:
    """``DATA_FIELDS`` as the run was given them, and its files resolved (``files``: given -> absolute) so that
    ``leanft eval`` finds them from another folder too. A sequential stage's adapter is evaluated on the tasks
    up to its own, as after that stage."""
    data = {k: getattr(cfg, k) for k in DATA_FIELDS}
    if cfg.sequential:
        data["task"] = ",".join(cfg.task.split(",")[: stage[-1] + 1])
    files = [f for f in (cfg.train_file, cfg.eval_file, *cfg.task.split(",")) if f and tasks.is_data_file(f)]
    return {**data, "files": {f: str(Path(f).resolve()) for f in files}}


def predictions_file(folder: Path, task: str, split: str) -> Path:
    """Where an evaluation's per-example predictions go (``RUN_FILES`` matches them)."""
    return Path(folder) / f"predictions-{task}-{split}.jsonl"


def rerun_data(data: dict) -> dict:
    """``run_data``'s record read back: each file at its absolute path, or at the path as given when only that
    one exists (the run and its data moved together)."""
    data = dict(data)
    files = data.pop("files", {})

    def moved(given: str) -> str:
        absolute = files.get(given, given)
        return given if not Path(absolute).exists() and Path(given).exists() else absolute

    for key in ("train_file", "eval_file"):
        if data.get(key):
            data[key] = moved(data[key])
    data["task"] = ",".join(map(moved, data["task"].split(",")))
    return data


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` has a checkpoint to resume from (also one a crash left aside, or a damaged one, which
    ``resume`` then reports rather than a fresh start silently replacing it)."""
    return checkpoint.exists(out)


def save_checkpoint(out: Path, updater, state: dict, accel) -> None:
    """Checkpoint the loop's ``state`` and ``updater`` (its trainable tensors and ``state_dict``). Called by
    every process at the same step: where the updater draws random numbers (dropout), each process's RNG
    states are gathered; the first process writes."""
    rngs = []
    if updater.random:
        mine = checkpoint.rng_states()
        rngs = [mine]
        if accel.num_processes > 1:
            rngs = [None] * accel.num_processes if accel.is_main_process else None
            dist.gather_object(mine, rngs, dst=0)
    if accel.is_main_process:
        checkpoint.save(out, state, updater.model, updater.state_dict(), rngs)


def resume(out: Path, updater, accel) -> dict:
    """The loop's state of ``out``'s checkpoint, with ``updater``'s tensors, state and this process's RNG
    states restored (``checkpoint.load`` checks every file first)."""
    def same_kind(extra: dict, path: Path) -> None:
        saved = extra.get("kind", "first-order (AdamW)")  # older leanft: first-order checkpoints only
        if saved != updater.kind:
            raise checkpoint.CheckpointError(f"{out} holds a {saved} run ({path.name}), not a {updater.kind} one: "
                                             "resume it with the method and --optimizer it was started with")

    state, extra = checkpoint.load(out, updater.model, rank=accel.process_index, world=accel.num_processes,
                                   check=same_kind)
    extra.setdefault("forwards", state.get("forwards", 0))  # older leanft: the loop kept the count
    updater.load_state_dict(extra, state["step"])
    return state


def save_best(out: Path, model: nn.Module, tokenizer, run_info: dict) -> None:
    """``out/best``: the adapter (or the whole fine-tuned model with its tokenizer) and the run's facts."""
    def write(d: Path) -> None:
        model.save_pretrained(d)
        if not isinstance(model, PeftModel):
            tokenizer.save_pretrained(d)
        (d / "leanft_run.json").write_text(json.dumps(run_info, indent=1))

    checkpoint.atomic_dir(out / "best", write)


def load_best(out: Path, model: nn.Module) -> None:
    """Put the kept best trainable weights back into ``model`` (from where a crash left them: ``complete_dir``)."""
    best = checkpoint.complete_dir(out / "best") or out / "best"
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(best)))
    else:
        files = sorted(best.glob("*.safetensors"))
        model.load_state_dict({k: v for f in files for k, v in load_file(str(f)).items()}, strict=False)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (runs and reports plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and dev metric against steps, one PNG (``curves.png``)."""
    if not history:
        return
    plt = pyplot()
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
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9, wspace=0.25)  # tight_layout: 2x the time
    fig.savefig(path, dpi=100)
    plt.close(fig)
