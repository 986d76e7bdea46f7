"""The ``leanft train`` flags: one per TrainConfig field, the method options, and a YAML --config under them."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import yaml

from .config import CHOICES, TrainConfig
from .config import HELP as TRAIN_HELP
from .runfolder import DATA_SOURCE

TRAIN_CHOICES = {name: list(valid) for name, valid in CHOICES.items()}


def comma_list(value: str) -> list[str]:
    """A comma-separated flag value as a list (empty entries dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def tt_shapes(value: str) -> tuple[str, list[int]]:
    """``INxOUT=a,b,...``: the TT factor shape of every ``IN x OUT`` matrix (product ``IN * OUT``)."""
    key, sep, modes = value.partition("=")
    size = key.lower().split("x")
    try:
        if not sep or len(size) != 2:
            raise ValueError
        in_out, shape = [int(n) for n in size], [int(m) for m in modes.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected INxOUT=a,b,... (e.g. 576x8=8,9,8,8)") from None
    if in_out[0] * in_out[1] != math.prod(shape):
        raise argparse.ArgumentTypeError(f"{value!r}: the modes multiply to {math.prod(shape)}, "
                                         f"not {key} = {in_out[0] * in_out[1]}")
    return f"{in_out[0]}x{in_out[1]}", shape


DENSE_CLASSIFIER_HELP = ("LoRETTA on sequence classification: train the classifier's hidden dense layer densely "
                         "instead of the papers' TT-linear head")
METHOD_FLAGS = {"rank": int, "tt_rank": int, "bottleneck": int, "alpha": float, "dropout": float, "init_mode": str,
                "target_modules": comma_list, "input_modules": comma_list}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; only flags given on the command line override --config."""
    p.add_argument("--config", help="YAML file of TrainConfig keys; flags given here override it")
    for f in fields(TrainConfig):
        if f.name not in TRAIN_HELP:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{TRAIN_HELP[f.name]} (default {default})")
        elif f.name in ("text_columns", "label_words"):
            p.add_argument(flag, type=lambda v: v.split(","), default=argparse.SUPPRESS, help=TRAIN_HELP[f.name])
        else:
            kind = type(default) if default is not None else str
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=TRAIN_CHOICES.get(f.name),
                           help=f"{TRAIN_HELP[f.name]} (default {default})")
    for name, kind in METHOD_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=f"method option {name} (see leanft.methods.OPTION_FIELDS)"
                       + (", comma-separated; default: found from the model's module names" if kind is comma_list else ""))
    p.add_argument("--tt-shapes", type=tt_shapes, nargs="+", default=argparse.SUPPRESS, metavar="INxOUT=a,b,...",
                   help="LoRETTA: TT factor shape of every IN x OUT matrix, e.g. 576x8=8,9,8,8 (default: factorised)")
    p.add_argument("--no-train-norms", dest="train_norms", action="store_false", default=argparse.SUPPRESS,
                   help="keep normalisation layers frozen (LoRETTA)")
    p.add_argument("--dense-classifier", dest="tt_classifier", action="store_false", default=argparse.SUPPRESS,
                   help=DENSE_CLASSIFIER_HELP)


# Where a run's data comes from: naming one of these drops all of them from the values underneath (``train_config``)


def _yaml_place(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's explanation in one line (its own text spans several, with a copy of the line)."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error).splitlines()[0]


def train_config(args: argparse.Namespace, under: dict | None = None) -> TrainConfig:
    """The flags given, over the --config file's keys, over ``under`` (``leanft eval``: the run's data options;
    naming another data source there, --task, --train-file or --dataset, drops the run's whole source)."""
    values = {}
    if getattr(args, "config", None):
        try:
            values = yaml.safe_load(Path(args.config).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{args.config}{_yaml_place(e)}: not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: expected a mapping of TrainConfig keys")
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "adapter")}
    if "tt_shapes" in given:
        given["tt_shapes"] = dict(given["tt_shapes"])
    flags = {*METHOD_FLAGS, "train_norms", "tt_classifier", "tt_shapes"}
    options = {**values.pop("method_options", {}), **{k: given.pop(k) for k in list(given) if k in flags}}
    chosen = {**values, **given}
    under = dict(under or {})
    if chosen.keys() & {"task", "train_file", "dataset"}:
        under = {k: v for k, v in under.items() if k not in DATA_SOURCE}
    return TrainConfig.from_dict({**under, **chosen, "method_options": options})

