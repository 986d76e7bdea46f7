"""How a run gets its model, in the order it happens:

1. the name (``cfg.model``: a built-in name, a folder, a hub id or a ``.gguf`` file) gives the base model
   and its tokenizer in ``cfg.dtype`` (``models.load_model``), with a classification head as wide as the
   widest task for an encoder;
2. the method is applied (``methods.apply_method``): what trains, every trainable tensor in float32;
3. the model moves to the accelerator's device (``accelerator``);
4. ``Loaded`` holds it with the network whose forward gives the loss and how it computes (autocast to
   ``cfg.dtype``).

``leanft eval`` loads a saved adapter instead of applying a method (``load_saved``); ``check_adapter_config``
checks the adapter's own file first. A run's data comes from ``tasks.load_tasks``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch import nn

from . import methods, models, objectives, tasks
from .config import TrainConfig
from .precision import Precision, dtype_of
from .tasks.collate import Tokenized


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


def accelerator() -> Accelerator:
    return Accelerator(cpu=models.default_device().type == "cpu")  # on CPU: gloo under torchrun


@dataclass
class Loaded:
    """A model ready to be trained or scored: the adapted ``model``, the ``net`` whose forward gives the
    loss (``objectives.network``), its tokenizer, whether it is a decoder, and the accelerator it runs on.
    ``precision`` says how it computes (autocast to ``cfg.dtype``); ``tokenized`` keeps the examples' token
    ids once made (``tasks.collate.Tokenized``), shared by training and every evaluation."""

    model: nn.Module
    net: nn.Module
    tokenizer: object
    decoder: bool
    accelerator: Accelerator
    cfg: TrainConfig
    tokenized: Tokenized | None = None  # None: a new one, for this tokenizer and cfg.max_length

    def __post_init__(self) -> None:
        if self.tokenized is None:
            self.tokenized = Tokenized(self.tokenizer, self.cfg.max_length, self.decoder)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def precision(self) -> Precision:
        return Precision(self.cfg.dtype, self.device.type)


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
        keys = re.findall(r"'([^']+)'", str(missing[0].message))
        raise ValueError(f"the adapter in {adapter_dir} does not fit the base model {model_name!r}: Found missing "
                         f"adapter keys while loading the checkpoint: {len(keys)} keys, e.g. {keys[0]!r}"
                         if keys else f"the adapter in {adapter_dir} does not fit the base model {model_name!r}: "
                         f"{str(missing[0].message).splitlines()[0][:300]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def load_saved(adapter_dir: Path, cfg: TrainConfig, num_labels: int) -> Loaded:
    """A run's saved ``best/`` folder, ready to score: its adapter on the base model ``cfg.model`` (the
    adapter's own config checked first, so that a bad file is not blamed on the base model), or the
    fully fine-tuned model it holds; on the accelerator's device, in eval mode."""
    accel = accelerator()
    decoder = models.model_kind(cfg.model) == "causal"
    dtype = dtype_of(cfg.dtype)
    if (adapter_dir / "adapter_config.json").is_file():
        check_adapter_config(adapter_dir)
        base, tokenizer = models.load_model(cfg.model, num_labels=num_labels, dtype=dtype)
        model = _load_adapter(base, adapter_dir, cfg.model)
    else:
        model, tokenizer = models.load_model(str(adapter_dir), num_labels=num_labels, dtype=dtype,
                                             task="causal" if decoder else "seq_cls")
    model = model.to(accel.device).eval()
    return Loaded(model, objectives.network(model, decoder), tokenizer, decoder, accel, cfg)
