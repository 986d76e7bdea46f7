"""LaMDA tuner: SVD-initialised layers on the targets; P_B frozen and LaMDA++ ranks by ``schedule``."""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from ..common import LeanftTuner
from .config import LamdaConfig
from .layer import LamdaLayer, Linear
from .schedule import frozen_count, lamda_ranks


class LamdaModel(LeanftTuner):
    prefix = "lamda_"
    tuner_layer_cls = LamdaLayer
    layer_cls = Linear

    def _pre_injection_hook(self, model: nn.Module, config: LamdaConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        if config.rank_allocation == "spectrum" and config.rank_pattern is None:
            config.rank_pattern = lamda_ranks(model, config)  # saved with the config: reloads the same ranks

    def _layer_kwargs(self, config: LamdaConfig, key: str) -> dict[str, int]:
        return {"r": (config.rank_pattern or {}).get(key, config.r)}

    # training forwards after which a LaMDA model whose schedule was never run says so, once
    UNFROZEN_WARNING = 20

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and not getattr(self, "_schedule_ran", False):
            if "transformers.trainer" in sys.modules and not getattr(self, "_trainer_checked", False):
                from .trainer import schedule_lamda_in_trainer  # a Trainer lacking LamdaCallback gets one

                self._trainer_checked = schedule_lamda_in_trainer(self)
            self._unscheduled = getattr(self, "_unscheduled", 0) + 1
            if self._unscheduled == self.UNFROZEN_WARNING:
                warnings.warn(
                    f"LaMDA has trained for {self.UNFROZEN_WARNING} forward passes and P_B was never frozen: without "
                    "its schedule LaMDA is a plain SVD-initialised adapter. In your own loop call "
                    "model.base_model.update_freezing(step, total_steps) after every optimiser step (a Trainer or "
                    "SFTTrainer does it through leanft.LamdaCallback, which it gets by itself)", stacklevel=2)
        return super().forward(*args, **kwargs)

    def lamda_layers(self) -> list[LamdaLayer]:
        return [m for m in self.model.modules() if isinstance(m, LamdaLayer)]

    def update_freezing(self, step: int, total_steps: int) -> int:
        """Freeze P_B's columns on schedule; returns the number of frozen columns over all modules.

        A trainer calls ``model.base_model.update_freezing(step, total_steps)`` right after every
        ``optimizer.step()``, with ``step`` the optimiser steps done so far (1 after the first) and
        ``total_steps`` the planned total T; each module then has ``min(r, floor(r step / (freeze_fraction
        T)))`` frozen columns. Frozen columns stay exactly as they were (see ``LamdaLayer.freeze_columns``).
        The schedule is not saved with the adapter: when resuming, call it once before the first step.
        """
        self._schedule_ran = True
        frozen = 0
        for layer in self.lamda_layers():
            for name in self.active_adapters:
                if name in layer.lamda_B:
                    fraction = self.peft_config[name].freeze_fraction
                    layer.freeze_columns(name, frozen_count(layer.r[name], step, total_steps, fraction))
                    frozen += layer.lamda_frozen[name]
        return frozen

    def trainable_counts(self) -> dict[str, int]:
        """Parameters the optimiser still updates: S, P_B's unfrozen columns, everything else trainable
        (e.g. a classifier head) and their total; for logging trainable parameters over time."""
        s = b = 0
        seen = set()
        for layer in self.lamda_layers():
            for name in layer.lamda_S:
                seen |= {id(layer.lamda_S[name]), id(layer.lamda_B[name])}
                s += layer.lamda_S[name].numel() if layer.lamda_S[name].requires_grad else 0
                live = layer.r[name] - layer.lamda_frozen[name]
                b += layer.out_features * live if layer.lamda_B[name].requires_grad else 0
        other = sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in seen)
        return {"S": s, "P_B": b, "other": other, "total": s + b + other}
