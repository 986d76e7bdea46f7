"""From a ``TrainConfig`` to what a run is made of: the tasks with their splits and the adapted model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from . import methods, models, objectives, tasks
from .config import TrainConfig
from .precision import Precision, dtype_of


@dataclass
class Loaded:
    """A model ready to be trained or scored: the adapted ``model``, the ``net`` whose forward gives the
    loss (``objectives.network``), its tokenizer, whether it is a decoder, and the accelerator it runs on.
    ``precision`` says how it computes (autocast to ``cfg.dtype``)."""

    model: nn.Module
    net: nn.Module
    tokenizer: object
    decoder: bool
    accelerator: Accelerator
    cfg: TrainConfig

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def precision(self) -> Precision:
        return Precision(self.cfg.dtype, self.device.type)


def accelerator() -> Accelerator:
    return Accelerator(cpu=models.default_device().type == "cpu")  # on CPU: gloo under torchrun


def load_tasks(cfg: TrainConfig) -> list[tuple[tasks.Task, tasks.Splits]]:
    """The built-in tasks of ``cfg.task``, or one task from the user's files or a hub dataset."""
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
    num_labels = max(t.num_labels for t in task_list)
    model, tokenizer = models.load_model(cfg.model, num_labels=num_labels, dtype=dtype_of(cfg.dtype))
    model = methods.apply_method(model, cfg.method, models.task_type(cfg.model), **cfg.method_options)
    return model, tokenizer, decoder


def load(cfg: TrainConfig, task_list: list[tasks.Task], accel: Accelerator) -> Loaded:
    """``build_model`` on the accelerator's device, wrapped for the loss."""
    model, tokenizer, decoder = build_model(cfg, task_list)
    model.to(accel.device)
    return Loaded(model, objectives.network(model, decoder), tokenizer, decoder, accel, cfg)
