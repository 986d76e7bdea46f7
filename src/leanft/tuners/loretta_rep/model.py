"""LoRETTA_rep tuner: wraps the target linears of a model in ``Linear`` layers."""

from __future__ import annotations

from ..common import LeanftTuner
from .layer import Linear, LorettaRepLayer

# Default targets: the reference's q and v projections (DeBERTa v1: its fused in_proj).
TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt")},
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
}


class LorettaRepModel(LeanftTuner):
    prefix = "loretta_rep_"
    tuner_layer_cls = LorettaRepLayer
    target_module_mapping = TARGETS
    layer_cls = Linear
