"""LoRETTA_adp layer: a TT bottleneck adapter on the input or the output of a linear layer."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from ...tt import TTMatrix
from ..common import StartCopies, linear_features, param_device, shape_for
from ..tt_head import TTHead
from .config import LorettaAdpConfig


class TTAdapter(nn.Module):
    """``s * U(act(D(u)))`` with TT projections ``D: h -> b`` and ``U: b -> h`` (both with bias)."""

    def __init__(self, down: TTMatrix, up: TTMatrix, non_linearity: str, scaling: float) -> None:
        super().__init__()
        self.down, self.up, self.non_linearity, self.scaling = down, up, non_linearity, scaling
        self.act = ACT2FN[non_linearity]

    @classmethod
    def create(cls, hidden: int, config: LorettaAdpConfig, device: torch.device | None = None) -> "TTAdapter":
        b, rank, shapes = config.bottleneck_size, config.tt_rank, config.tt_shapes
        down = TTMatrix(hidden, b, rank, shape_for(shapes, hidden, b), bias=True, device=device)
        up = TTMatrix(b, hidden, rank, shape_for(shapes, b, hidden), bias=True, device=device)
        return cls(down, up, config.non_linearity, config.scaling)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.act(self.down(u)))

    def frozen_copy(self) -> "TTAdapter":
        return TTAdapter(self.down.frozen_copy(), self.up.frozen_copy(), self.non_linearity, self.scaling)


class LorettaAdpLayer(StartCopies, BaseTunerLayer):
    adapter_layer_names = ("loretta_adp_adapter",)
    other_param_names = ("loretta_adp_adapter0", "loretta_adp_dropout", "placement")
    # trainable adapters -> their frozen start, towards which weight decay pulls. Only the noise-free start
    # keeps copies; without them (zero_core, reference) decay pulls towards zero, the zeroed core's start.
    start_copies = {"loretta_adp_adapter": "loretta_adp_adapter0"}

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        self.base_layer = base_layer
        self.name = name
        self.in_features, self.out_features = linear_features(base_layer, name, "LoRETTA_adp")
        self.loretta_adp_adapter = nn.ModuleDict()
        self.loretta_adp_adapter0 = nn.ModuleDict()  # initial adapters, frozen (noise-free start)
        self.loretta_adp_dropout = nn.ModuleDict()
        self.placement: dict[str, str] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    def update_layer(self, adapter_name: str, config: LorettaAdpConfig, placement: str) -> None:
        hidden = self.in_features if placement == "input" else self.out_features
        if config.bottleneck_size >= hidden:
            raise ValueError(
                f"bottleneck_size {config.bottleneck_size} is not smaller than the hidden size {hidden} at "
                f"{self.name}: a bottleneck adapter must reduce the dimension"
            )
        adapter = TTAdapter.create(hidden, config, device=param_device(self.get_base_layer()))
        self.loretta_adp_adapter[adapter_name] = adapter
        if config.init_mode == "noise_free":
            self.loretta_adp_adapter0[adapter_name] = adapter.frozen_copy()
        elif config.init_mode == "zero_core":  # U maps everything to 0, so A(u) = 0: no copy needed
            adapter.up.zero_last_core()
        p = config.adapter_dropout
        self.loretta_adp_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.placement[adapter_name] = placement
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise TypeError(
            "LoRETTA_adp adapters are non-linear bottlenecks and cannot be merged into the weights; keep the "
            "PeftModel for inference, or use LoRETTA_rep (loretta-rep) for a mergeable update"
        )

    def unmerge(self) -> None:  # nothing is ever merged
        pass

    def adapter_output(self, name: str, u: torch.Tensor) -> torch.Tensor:
        """``A(u) - A0(u)`` (or ``A(u)`` without a frozen start: zero_core, reference), computed in fp32."""
        u = self.loretta_adp_dropout[name](u.float())
        out = self.loretta_adp_adapter[name](u)
        if name in self.loretta_adp_adapter0:
            with torch.no_grad():
                start = self.loretta_adp_adapter0[name](u)
            out = out - start
        return out

    def _added(self, placement: str, u: torch.Tensor) -> torch.Tensor:
        names = [n for n in self.active_adapters if self.placement.get(n) == placement]
        if self.disable_adapters or not names:
            return u
        return u + sum(self.adapter_output(n, u) for n in names).to(u.dtype)


class Linear(nn.Module, LorettaAdpLayer):
    def __init__(
        self, base_layer: nn.Linear, adapter_name: str, config: LorettaAdpConfig, placement: str, name: str = ""
    ) -> None:
        super().__init__()
        LorettaAdpLayer.__init__(self, base_layer, name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, placement)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._added("output", self.base_layer(self._added("input", x), *args, **kwargs))

    def __repr__(self) -> str:
        return "loretta_adp." + super().__repr__()


class LorettaAdpHead(TTHead):
    """The TT classifier head of LoRETTA_adp (``tuners.tt_head``), saved under the method's prefix."""

    adapter_layer_names = ("loretta_adp_head",)
