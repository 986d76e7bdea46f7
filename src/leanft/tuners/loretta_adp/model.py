"""LoRETTA_adp tuner: wraps target linears in adapter layers, input or output placement."""

from __future__ import annotations

from ..common import BERT_LIKE, LLAMA_LIKE, LeanftTuner
from .config import LorettaAdpConfig
from .layer import Linear, LorettaAdpLayer

TARGETS: dict[str, list[str] | str] = {
    **{t: ["gate_proj", "up_proj", "down_proj"] for t in LLAMA_LIKE},
    **{t: r".*\.output\.dense" for t in BERT_LIKE},
}
INPUT_TARGETS: dict[str, list[str]] = {t: ["gate_proj", "up_proj"] for t in LLAMA_LIKE}


class LorettaAdpModel(LeanftTuner):
    prefix = "loretta_adp_"
    tuner_layer_cls = LorettaAdpLayer
    target_module_mapping = TARGETS
    layer_cls = Linear

    def _prepare_adapter_config(self, peft_config: LorettaAdpConfig, model_config: dict) -> LorettaAdpConfig:
        if peft_config.input_modules is None:
            default_targets = peft_config.target_modules is None
            peft_config.input_modules = INPUT_TARGETS.get(model_config.get("model_type"), []) if default_targets else []
        return super()._prepare_adapter_config(peft_config, model_config)

    def _layer_kwargs(self, config: LorettaAdpConfig, key: str) -> dict[str, str]:
        inputs = config.input_modules or []
        return {"placement": "input" if any(key == m or key.endswith("." + m) for m in inputs) else "output"}
