"""LoRETTA_rep tuner: wraps the target linears of a model in ``Linear`` layers.

Default targets are the reference's q and v projections, found by name (``targets.attention_targets``).
"""

from __future__ import annotations

from ..common import LeanftTuner
from .layer import Linear, LorettaRepHead, LorettaRepLayer


class LorettaRepModel(LeanftTuner):
    prefix = "loretta_rep_"
    tuner_layer_cls = (LorettaRepLayer, LorettaRepHead)  # PEFT only isinstance-checks it
    layer_cls = Linear
    head_cls = LorettaRepHead
