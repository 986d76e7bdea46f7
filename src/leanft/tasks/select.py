"""A run's data: from its ``TrainConfig`` to the tasks it trains on, each with its sampled splits.

One of three sources: a hub dataset (``dataset``), the user's ``train_file``, or ``task``'s comma-separated
built-in names and users' files. A users' file is a classification task unless instruction columns are set.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .. import models
from .base import Splits, Task
from .builtin import get_task, load_splits
from .instruct import instruction_task
from .user import hub_task, is_data_file, user_task

if TYPE_CHECKING:  # leanft.config imports this package
    from ..config import TrainConfig


def load_tasks(cfg: TrainConfig) -> list[tuple[Task, Splits]]:
    """The tasks of a run: a hub dataset, the user's ``train_file``, or the comma-separated ``cfg.task``,
    whose entries are built-in task names or users' files (one mixture, e.g. ``sst2,notes.jsonl``). Every
    one is sampled by ``num_train``, ``num_dev`` and ``num_eval`` alike."""
    if cfg.dataset:
        return [_named(cfg, hub_task(cfg.dataset, config=cfg.dataset_config, num_train=cfg.num_train,
                                     num_dev=cfg.num_dev, num_eval=cfg.num_eval, seed=cfg.seed,
                                     **_classification_columns(cfg)))]
    if cfg.train_file:
        return [_users_task(cfg, cfg.train_file, cfg.eval_file)]
    loaded = [_users_task(cfg, name, None) if is_data_file(name) else
              (get_task(name), load_splits(name, cfg.num_train, cfg.num_dev, cfg.num_eval, cfg.seed))
              for name in cfg.task.split(",")]
    names = [t.name for t, _ in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"task name(s) {twice} appear more than once in --task {cfg.task!r} (a file is named by "
                         "its stem, or its folder for a stem like 'train'): rename the file(s)")
    return loaded


def _classification_columns(cfg: TrainConfig) -> dict:
    if not cfg.text_columns or not cfg.label_column:
        raise ValueError("users' data needs text_columns and label_column (--text-columns, --label-column), or "
                         "for instruction data --prompt-column and --completion-column, or --messages-column")
    return {"text_columns": cfg.text_columns, "label_column": cfg.label_column, "template": cfg.template,
            "label_words": cfg.label_words}


def _users_task(cfg: TrainConfig, path: str, eval_file: str | None) -> tuple[Task, Splits]:
    """A users' file as an instruction task when instruction columns are set, else as a classification task."""
    sizes = {"num_train": cfg.num_train, "num_dev": cfg.num_dev, "num_eval": cfg.num_eval, "seed": cfg.seed}
    if not cfg.instruction:
        return _named(cfg, user_task(path, eval_file, **sizes, **_classification_columns(cfg)))
    tokenizer = models.load_tokenizer(cfg.model) if cfg.messages_column else None  # its chat template
    return _named(cfg, instruction_task(path, eval_file, prompt_column=cfg.prompt_column,
                                        completion_column=cfg.completion_column,
                                        messages_column=cfg.messages_column, tokenizer=tokenizer, **sizes))


def _named(cfg: TrainConfig, loaded: tuple[Task, Splits]) -> tuple[Task, Splits]:
    """The users' task renamed ``cfg.task_name`` when given (it is the run's only one: ``TrainConfig``)."""
    task, splits = loaded
    return (replace(task, name=cfg.task_name) if cfg.task_name else task), splits
