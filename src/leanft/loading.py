"""From a ``TrainConfig`` to what a run is made of: the tasks with their splits and the adapted model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

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
    """The tasks of a run: a hub dataset, the user's ``train_file``, or the comma-separated ``cfg.task``,
    whose entries are built-in task names or users' files (one mixture, e.g. ``sst2,notes.jsonl``). Every
    one is sampled by ``num_train``, ``num_dev`` and ``num_eval`` alike."""
    if cfg.dataset:
        return [_named(cfg, tasks.hub_task(cfg.dataset, config=cfg.dataset_config, num_train=cfg.num_train,
                                           num_dev=cfg.num_dev, num_eval=cfg.num_eval, seed=cfg.seed,
                                           **_classification_columns(cfg)))]
    if cfg.train_file:
        return [_users_task(cfg, cfg.train_file, cfg.eval_file)]
    loaded = [_users_task(cfg, name, None) if tasks.is_data_file(name) else
              (tasks.get_task(name), tasks.load_splits(name, cfg.num_train, cfg.num_dev, cfg.num_eval, cfg.seed))
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


def _users_task(cfg: TrainConfig, path: str, eval_file: str | None) -> tuple[tasks.Task, tasks.Splits]:
    """A users' file as an instruction task when instruction columns are set, else as a classification task."""
    sizes = {"num_train": cfg.num_train, "num_dev": cfg.num_dev, "num_eval": cfg.num_eval, "seed": cfg.seed}
    if not cfg.instruction:
        return _named(cfg, tasks.user_task(path, eval_file, **sizes, **_classification_columns(cfg)))
    tokenizer = models.load_tokenizer(cfg.model) if cfg.messages_column else None
    return _named(cfg, tasks.instruction_task(path, eval_file, prompt_column=cfg.prompt_column,
                                              completion_column=cfg.completion_column,
                                              messages_column=cfg.messages_column, tokenizer=tokenizer, **sizes))


def _named(cfg: TrainConfig, loaded: tuple[tasks.Task, tasks.Splits]) -> tuple[tasks.Task, tasks.Splits]:
    """The users' task renamed ``cfg.task_name`` when given (it is the run's only one: ``TrainConfig``)."""
    task, splits = loaded
    return (replace(task, name=cfg.task_name) if cfg.task_name else task), splits


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


# adapter_config.json keys whose defaults would silently give other adapter shapes than the saved weights have
SHAPE_KEYS = ("r", "tt_rank", "bottleneck_size", "target_modules")


def read_json(path: Path):
    """A JSON file's content; a broken file is an error that names it, the line and the column."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _type_problem(key: str, default, value) -> str | None:
    """What is wrong with ``value``: a size that is no positive integer, or another JSON type than the field's
    default has (true/false, a number, a string)."""
    if key in SHAPE_KEYS[:3]:
        return None if type(value) is int and value > 0 else f"{key} is {json.dumps(value)}, not a positive integer"
    kind = "true or false" if isinstance(default, bool) else "a number" if isinstance(default, (int, float)) \
        else "a string" if isinstance(default, str) else None
    ok = {"true or false": (bool,), "a number": (int, float), "a string": (str,)}.get(kind, object)
    if kind and (not isinstance(value, ok) or (isinstance(value, bool) and kind != "true or false")):
        return f"{key} is {json.dumps(value)}, not {kind}"
    return None


def check_adapter_config(adapter_dir: Path) -> None:
    """What is wrong in an adapter's adapter_config.json, said against the file before a base model is loaded:
    PEFT drops unknown keys with a warning and fills missing ones with defaults, so an edited file would
    otherwise surface as an adapter that "does not fit the base model"."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = adapter_dir / "adapter_config.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    if "peft_type" not in data:
        raise ValueError(f"{path} has no peft_type (the adapter's method, e.g. \"LORA\")")
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(data["peft_type"])
    if config_cls is None:
        known = ", ".join(sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ValueError(f"{path}: peft_type {data.get('peft_type')!r} is not a known adapter type ({known})")
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - set(fields))
    missing = [k for k in SHAPE_KEYS if k in fields and k not in data]
    problems = ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else [])
    problems += filter(None, (_type_problem(k, fields[k], v) for k, v in data.items() if k in fields))
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}")
    try:
        config_cls(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
