"""The output folder of a run: claimed before anything loads (a fresh run never silently replaces another;
``--overwrite`` deletes the old run's files first), and the data options ``best/leanft_run.json`` keeps so
that ``leanft eval`` reruns the run's evaluation."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from accelerate.utils import broadcast_object_list

from . import tasks
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
