"""LoRETTA_adp tuner: wraps target linears in adapter layers, input or output placement."""

from __future__ import annotations

import re

from torch import nn

from ..common import LeanftTuner
from ..targets import adapter_targets, check_targets
from .config import LorettaAdpConfig
from .layer import Linear, LorettaAdpHead, LorettaAdpLayer


class LorettaAdpModel(LeanftTuner):
    prefix = "loretta_adp_"
    tuner_layer_cls = (LorettaAdpLayer, LorettaAdpHead)  # PEFT only isinstance-checks it
    layer_cls = Linear
    head_cls = LorettaAdpHead

    def _default_targets(self, model: nn.Module, config: LorettaAdpConfig) -> None:
        """Targets and input placements from the model's module names (``targets.adapter_targets``)."""
        config.target_modules, inputs = adapter_targets(model)
        if config.input_modules is None:
            config.input_modules = inputs

    def _prepare_adapter_config(self, peft_config: LorettaAdpConfig, model_config: dict) -> LorettaAdpConfig:
        """Input modules are adapted even when ``target_modules`` leaves them out (``--target-modules down_proj
        --input-modules gate_proj,up_proj`` is three adapters per layer); each must name a module."""
        super()._prepare_adapter_config(peft_config, model_config)
        inputs = list(peft_config.input_modules or [])
        targets = peft_config.target_modules
        if not inputs or (isinstance(targets, str) and targets.lower() == "all-linear"):
            return peft_config
        check_targets(self.model, inputs, "LoRETTA_adp input_modules")
        if isinstance(targets, str):  # a regex: the modules it matches, by full name
            targets = [name for name, _ in self.model.named_modules() if name and re.fullmatch(targets, name)]
        peft_config.target_modules = [*targets, *(m for m in inputs if m not in targets)]
        return peft_config

    def _layer_kwargs(self, config: LorettaAdpConfig, key: str) -> dict[str, str]:
        inputs = config.input_modules or []
        return {"placement": "input" if any(key == m or key.endswith("." + m) for m in inputs) else "output"}
