"""What every leanft tuner shares: PEFT registration, trainable norms, the base-model check.

PEFT's ``PeftType`` is a closed enum, so leanft owns a ``str`` enum and writes its methods into PEFT's
lookup tables directly (every lookup there is a dict key or ``in`` check, and a ``str`` enum member
hashes and compares as its value, which is what a reloaded ``adapter_config.json`` holds).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, check_adapters_to_merge
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .targets import attention_targets, check_targets
from .tt_head import TTHead, fit_modules_to_save


class LeanftPeftType(str, enum.Enum):
    LORETTA_ADP = "LORETTA_ADP"
    LORETTA_REP = "LORETTA_REP"
    LAMDA = "LAMDA"

    def __str__(self) -> str:
        return self.value


def register(peft_type: LeanftPeftType, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``peft_type`` known to PEFT (get_peft_model, save/load, PeftModel.from_pretrained)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The few config values that identify which base model an adapter belongs to."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return {k: getattr(config, k) for k in FINGERPRINT_KEYS if getattr(config, k, None) is not None}


def norm_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the normalisation layers (LayerNorm, RMSNorm, ...), found by class name."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if "norm" in type(m).__name__.lower() and name}
    return sorted(names)


@dataclass
class LeanftConfig(PeftConfig):
    """Fields common to leanft's methods (see the method configs for the method-specific ones)."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex (full match); None = default for the architecture"},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained densely and saved with the adapter (e.g. a classifier)"}
    )
    train_norms: bool = field(
        default=True,
        metadata={"help": "Train all normalisation layers (the papers' parameter counts include them)"},
    )
    base_model_fingerprint: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Filled in on injection; loading onto a base model that differs raises an error"},
    )

    def _check_positive(self, **values: int) -> None:
        for name, value in values.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def _check_dropout_and_init(self, dropout: float, init_modes: tuple[str, ...]) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        if getattr(self, "init_mode", None) not in init_modes:
            raise ValueError(f"{type(self).__name__}: init_mode must be one of {', '.join(map(repr, init_modes))}; "
                             f"got {getattr(self, 'init_mode', None)!r}")


def _inputs_to_float32(module: nn.Module, args: tuple) -> tuple:
    module._leanft_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_like_input(module: nn.Module, args: tuple, output):
    dtype = getattr(module, "_leanft_dtype", None)
    if dtype is not None and torch.is_tensor(output) and output.is_floating_point():
        return output.to(dtype)
    return output


class StartCopies:
    """A tuner layer whose trainable tensors may start away from zero and keep frozen copies of that start
    (LoRETTA's noise-free start, LaMDA's SVD start): weight decay pulls them towards the start, since
    pulling towards zero would pull the model away from the pretrained one. ``start_copies`` maps each
    trainable container's attribute to its copy's; an adapter without a copy decays towards zero."""

    start_copies: dict[str, str] = {}

    def start_anchors(self) -> dict[int, torch.Tensor]:
        """``id(trainable tensor) -> its frozen start``, for the adapters that keep one."""
        anchors = {}
        for trained_name, copy_name in self.start_copies.items():
            trained, copy = getattr(self, trained_name), getattr(self, copy_name)
            for key in trained:
                if key not in copy:
                    continue
                if isinstance(trained[key], nn.Module):
                    starts = dict(copy[key].named_buffers())
                    anchors.update({id(p): starts[n] for n, p in trained[key].named_parameters()})
                else:
                    anchors[id(trained[key])] = copy[key]
        return anchors


class LeanftTuner(BaseTuner):
    """BaseTuner with leanft's checks before injection (targets exist, base model matches, norms) and
    the one way its layers are created: ``layer_cls(target, adapter_name, config, name, **layer_kwargs)``.
    """

    layer_cls: type[nn.Module]
    head_cls: type[TTHead] | None = None  # the TT classifier head of a method that has one (tuners.tt_head)

    @staticmethod
    def _check_target_module_exists(config: LeanftConfig, key: str) -> bool:
        """PEFT's matching, plus the classifier's hidden dense layer when it gets a TT head (it may sit
        inside a module that PEFT otherwise keeps whole in ``modules_to_save``)."""
        if key and getattr(config, "tt_classifier", False) and key == config.classifier_dense:
            return True
        return BaseTuner._check_target_module_exists(config, key)

    def _layer_kwargs(self, config: LeanftConfig, key: str) -> dict[str, Any]:
        """Extra per-module arguments of ``layer_cls`` and ``update_layer`` (none by default)."""
        return {}

    def _new_module(self, peft_config: LeanftConfig, adapter_name: str, target: nn.Module, key: str) -> nn.Module | None:
        """The adapted replacement of ``target``, or None when ``target`` is already adapted and got this adapter."""
        if self.head_cls is not None and getattr(peft_config, "tt_classifier", False) \
                and key == peft_config.classifier_dense:
            if isinstance(target, TTHead):
                target.update_layer(adapter_name, peft_config)
                return None
            return self.head_cls(target, adapter_name, peft_config, name=key)
        kwargs = self._layer_kwargs(peft_config, key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **kwargs)
            return None
        return self.layer_cls(target, adapter_name, peft_config, name=key, **kwargs)

    def _create_and_replace(
        self,
        peft_config: LeanftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        *,
        parameter_name: str | None = None,
    ) -> None:
        try:
            new = self._new_module(peft_config, adapter_name, target, current_key)
        except ValueError as e:  # e.g. a TT shape that cannot be factored: say which module
            raise ValueError(f"{peft_config.peft_type} on module {current_key!r}: {e}") from e
        if new is None:
            return
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT upcasts adapter weights; leanft upcasts every module that trains (norms, heads in
        ``modules_to_save`` too), so ``get_peft_model`` on a bf16/fp16 model trains float32 parameters.
        Such a module computes in float32 and hands its output back in its input's dtype, so the model
        runs as before with or without autocast."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
                continue
            copy = module.modules_to_save[adapter_name]
            low = [p for p in copy.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
            if low:
                for p in low:
                    p.data = p.data.float()
                copy.register_forward_pre_hook(_inputs_to_float32)
                copy.register_forward_hook(_output_like_input)

    def _pre_injection_hook(self, model: nn.Module, config: LeanftConfig, adapter_name: str) -> None:
        fp = model_fingerprint(model)
        if config.base_model_fingerprint is not None:
            diff = [f"{k} {v} (adapter) vs {fp[k]} (model)" for k, v in config.base_model_fingerprint.items()
                    if k in fp and fp[k] != v]
            if diff:
                raise ValueError(
                    f"this {config.peft_type} adapter was made for a different base model: {'; '.join(diff)}. "
                    "Load it onto the base model it was trained on."
                )
        # before the fingerprint is set: a config without one is new, not an adapter saved earlier
        self._prepare_adapter_config(config, {"model_type": fp.get("model_type")})
        if config.base_model_fingerprint is None:
            config.base_model_fingerprint = fp
        check_targets(model, config.target_modules, str(config.peft_type))
        if config.train_norms:
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(norm_module_names(model)))

    def _default_targets(self, model: nn.Module, config: LeanftConfig) -> None:
        """Fill in ``config.target_modules`` from ``model``'s module names (the attention query and value
        projections; LoRETTA_adp overrides this)."""
        config.target_modules = attention_targets(model, str(config.peft_type))

    def _prepare_adapter_config(self, peft_config: LeanftConfig, model_config: dict) -> LeanftConfig:
        # Called by the injection hook and again by PEFT's inject_adapter (add_adapter skips the hook).
        if peft_config.target_modules is None:
            self._default_targets(self.model, peft_config)
        fit_modules_to_save(self.model, peft_config)
        return peft_config


class DeltaLinearMixin:
    """A linear layer whose adapters add ``adapter_output(name, x)`` to the base output and merge as
    ``get_delta_weight(name)`` (``(out, in)``, fp32): LoRETTA_rep and LaMDA share this behaviour.
    ``adapter_layer_names[0]`` is the per-adapter container that says which adapters the layer has.
    """

    def _has(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if not self._has(name):
                continue
            merged = weight.data.float() + self.get_delta_weight(name).to(weight.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken")
            weight.data = merged.to(weight.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = (weight.data.float() - self.get_delta_weight(name).to(weight.device)).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if self._has(name):
                result = result + self.adapter_output(name, x).to(result.dtype)
        return result


def linear_features(module: nn.Module, name: str, method: str) -> tuple[int, int]:
    """``(in, out)`` of a target, which must be an ``nn.Linear``."""
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{method} adapts torch.nn.Linear layers only; {name} is a {type(module).__name__}")
    return module.in_features, module.out_features


def check_rank(method: str, rank: int, name: str, in_features: int, out_features: int) -> None:
    """Refuse a rank above the smaller side of the layer it adapts, before anything is allocated: such an
    update is no more expressive than the whole weight and costs more than the layer (a mistyped rank of
    100000 would otherwise fill the memory)."""
    limit = min(in_features, out_features)
    if rank > limit:
        raise ValueError(f"{method} rank {rank} exceeds {limit}, the smaller side of {name} ({in_features} in, "
                         f"{out_features} out): an update of that rank is no more expressive than training the "
                         f"layer in full and costs more than the layer; use a rank of at most {limit} (--rank), "
                         "or --method full")


def shape_for(config_shapes: dict[str, list[int]] | None, in_features: int, out_features: int) -> list[int] | None:
    """An explicit TT shape from a config's ``tt_shapes`` (keyed ``"INxOUT"``), if one is given."""
    return (config_shapes or {}).get(f"{in_features}x{out_features}")


def param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
