"""LoRETTA_adp tuner: wraps target linears in adapter layers, input or output placement."""

from __future__ import annotations

from torch import nn

from ..common import LeanftTuner
from ..targets import adapter_targets
from .config import LorettaAdpConfig
from .layer import Linear, LorettaAdpLayer


class LorettaAdpModel(LeanftTuner):
    prefix = "loretta_adp_"
    tuner_layer_cls = LorettaAdpLayer
    layer_cls = Linear

    def _default_targets(self, model: nn.Module, config: LorettaAdpConfig) -> None:
        """Targets and input placements from the model's module names (``targets.adapter_targets``)."""
        config.target_modules, inputs = adapter_targets(model)
        if config.input_modules is None:
            config.input_modules = inputs

    def _layer_kwargs(self, config: LorettaAdpConfig, key: str) -> dict[str, str]:
        inputs = config.input_modules or []
        return {"placement": "input" if any(key == m or key.endswith("." + m) for m in inputs) else "output"}
