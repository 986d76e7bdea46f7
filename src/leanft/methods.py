"""Fine-tuning methods by name: leanft's own tuners and the baselines users compare against.

``make_config`` turns a method name plus a few common options into a PEFT config (``None`` for full
fine-tuning); ``apply_method`` wraps a model with it. One place, so the CLI, the trainer and the
benchmarks all build methods the same way.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .precision import upcast_trainable
from .tuners import LamdaConfig, LorettaAdpConfig, LorettaRepConfig
from .tuners.common import check_rank
from .tuners.targets import attention_targets, check_targets, linear_modules

METHODS = ("full", "lora", "loretta-adp", "loretta-rep", "lamda", "lamda++", "mezo", "mezo-lora", "adazeta")
# Zeroth-order methods: the trainable set of another method, trained by SPSA (leanft.zo).
# AdaZeta is LoRETTA_adp with norms frozen (ZO noise on scale parameters hurts) and its query schedule; it
# keeps the paper's noise-free start (LoRETTA_adp's zero-core default was measured under AdamW only).
ZO_METHODS = {"mezo": "full", "mezo-lora": "lora", "adazeta": "loretta-adp"}

# Common option -> config field of each method (options a method does not know are an error).
OPTION_FIELDS: dict[str, dict[str, str]] = {
    "lora": {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"},
    "loretta-rep": {
        "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "tt_rank": "tt_rank",
        "target_modules": "target_modules", "train_norms": "train_norms", "init_mode": "init_mode",
        "tt_classifier": "tt_classifier", "classifier_dense": "classifier_dense", "tt_shapes": "tt_shapes",
    },
    "loretta-adp": {
        "bottleneck": "bottleneck_size", "dropout": "adapter_dropout", "tt_rank": "tt_rank",
        "target_modules": "target_modules", "input_modules": "input_modules", "train_norms": "train_norms",
        "init_mode": "init_mode", "tt_classifier": "tt_classifier", "classifier_dense": "classifier_dense",
        "tt_shapes": "tt_shapes",
    },
    "lamda": {
        "rank": "r", "alpha": "lamda_alpha", "dropout": "lamda_dropout", "target_modules": "target_modules",
        "train_norms": "train_norms", "init_mode": "lamda_init",
    },
    "full": {},
}
OPTION_FIELDS["lamda++"] = OPTION_FIELDS["lamda"]
OPTION_FIELDS.update({zo: OPTION_FIELDS[base] for zo, base in ZO_METHODS.items()})


def resolve_method(name: str) -> str:
    """Canonical method name; a typo gets the closest known name suggested."""
    key = name.strip().lower().replace("_", "-")
    if key in METHODS:
        return key
    close = difflib.get_close_matches(key, METHODS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown method {name!r}{hint} Known methods: {', '.join(METHODS)}")


def make_config(method: str, task_type: str, **options: Any) -> PeftConfig | None:
    """The PEFT config of ``method`` (LoRA baseline: r 8, alpha 16, dropout 0.05 on q and v)."""
    method = resolve_method(method)
    fields = OPTION_FIELDS[method]
    unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {unknown}; it takes {sorted(fields)}")
    kwargs = {fields[k]: v for k, v in options.items() if v is not None}
    if kwargs.get("target_modules") == ["all-linear"]:  # --target-modules all-linear: PEFT's shorthand
        kwargs["target_modules"] = "all-linear"
    if method == "adazeta":
        kwargs = {"train_norms": False, "init_mode": "noise_free", **kwargs}
    method = ZO_METHODS.get(method, method)
    if method == "full":
        return None
    if method == "lora":
        kwargs = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, **kwargs}
        if kwargs["r"] <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {kwargs['r']}")
        return LoraConfig(task_type=task_type, **kwargs)
    if method == "lamda++":  # LaMDA++: per-layer ranks from the weights' spectra, same total budget
        return LamdaConfig(task_type=task_type, rank_allocation="spectrum", **kwargs)
    config_cls = {"loretta-adp": LorettaAdpConfig, "loretta-rep": LorettaRepConfig, "lamda": LamdaConfig}[method]
    return config_cls(task_type=task_type, **kwargs)


def apply_method(model: nn.Module, method: str, task_type: str, **options: Any) -> nn.Module:
    """``model`` made trainable by ``method``: a PeftModel, or the model itself for full fine-tuning.

    Default target modules come from the model's module names (``tuners.targets``), for LoRA too (PEFT's
    own defaults are a table by model type).

    Every parameter that trains is float32 whatever the base model's dtype (``precision.upcast_trainable``),
    except under full-model MeZO, which trains low-precision weights in place by stochastic rounding.
    """
    config = make_config(method, task_type, **options)
    if config is None:
        model.requires_grad_(True)
    else:
        if isinstance(config, LoraConfig):  # leanft's tuners do both themselves
            check_targets(model, config.target_modules, "LoRA", conv1d=True)
            if config.target_modules is None:
                config.target_modules = attention_targets(model, "LoRA", conv1d=True)
            check_lora_rank(model, config)
        model = get_peft_model(model, config)
    return model if resolve_method(method) == "mezo" else upcast_trainable(model)


def check_lora_rank(model: nn.Module, config: LoraConfig) -> None:
    """LoRA's rank against the narrowest layer it targets, before PEFT allocates anything (PEFT checks nothing)."""
    sides = {}
    for name in linear_modules(model, conv1d=True):
        if config.target_modules == "all-linear" or check_target_module_exists(config, name):
            module = model.get_submodule(name)  # Linear: (out, in) weight; transformers' Conv1D: (in, out)
            out_in = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            sides[name] = (out_in[1], out_in[0])
    if sides:
        name = min(sides, key=lambda n: min(sides[n]))
        check_rank("LoRA", config.r, name, *sides[name])


def targeted_modules(model: nn.Module) -> list[str]:
    """Names of the modules a method adapted (none for full fine-tuning)."""
    return list(model.base_model.targeted_module_names) if isinstance(model, PeftModel) else []


def describe_targets(model: nn.Module) -> str:
    """The adapted modules in a few words, layer indices folded: ``q_proj, v_proj in 30 layers``."""
    names = targeted_modules(model)
    if not names:
        return "every weight (full fine-tuning)"
    layers: dict[str, set[str]] = {}  # name within a layer -> layer indices
    for name in names:
        found = re.match(r".*?\.(\d+)\.(.+)", name)
        suffix, index = (found.group(2), found.group(1)) if found else (name, None)
        layers.setdefault(suffix, set()).add(index)
    inside = [s for s, indices in layers.items() if None not in indices]  # a module outside layers keeps its name
    leaves = [s.rsplit(".", 1)[-1] for s in inside]
    short = {s: s for s in layers} | (dict(zip(inside, leaves)) if len(set(leaves)) == len(leaves) else {})
    groups: dict[frozenset, list[str]] = {}  # suffixes adapted in the same layers go together
    for suffix, indices in layers.items():
        groups.setdefault(frozenset(indices), []).append(short[suffix])
    parts = [", ".join(group) + ("" if None in indices else f" in {len(indices)} layers")
             for indices, group in groups.items()]
    return f"{'; '.join(parts)} ({len(names)} modules)"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (by numel, meta tensors included).

    The frozen originals kept by PEFT's ``modules_to_save`` wrappers are not counted in ``total``: the
    adapted model's size is the base model plus what the method adds.
    """
    skip = set()
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            skip.update(id(p) for p in module.original_module.parameters())
    params = [p for p in model.parameters() if id(p) not in skip]
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }
