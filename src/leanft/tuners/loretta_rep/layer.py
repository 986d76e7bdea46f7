"""LoRETTA_rep layer: ``y = W0 x + b0 + (alpha/r) * B(A(dropout(x)))`` with TT-matrix factors A and B."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...tt import TTMatrix
from ..common import DeltaLinearMixin, StartCopies, check_rank, linear_features, param_device, shape_for
from ..tt_head import TTHead
from .config import LorettaRepConfig


class LorettaRepLayer(StartCopies, BaseTunerLayer):
    adapter_layer_names = ("loretta_rep_A", "loretta_rep_B")
    other_param_names = ("loretta_rep_A0", "loretta_rep_B0", "loretta_rep_dropout", "r", "scaling")
    # trainable factors -> their frozen start, towards which weight decay pulls. Only the noise-free start
    # keeps copies; without them (zero_core, reference) decay pulls towards zero, the zeroed core's start.
    start_copies = {"loretta_rep_A": "loretta_rep_A0", "loretta_rep_B": "loretta_rep_B0"}

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer, name, "LoRETTA_rep")
        self.loretta_rep_A, self.loretta_rep_B = nn.ModuleDict(), nn.ModuleDict()
        self.loretta_rep_A0, self.loretta_rep_B0 = nn.ModuleDict(), nn.ModuleDict()  # initial factors, frozen
        self.loretta_rep_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    def update_layer(self, adapter_name: str, config: LorettaRepConfig) -> None:
        device = param_device(self.get_base_layer())
        i, o, r = self.in_features, self.out_features, config.r
        check_rank("LoRETTA_rep", r, "the layer", i, o)
        a = TTMatrix(i, r, config.tt_rank, shape_for(config.tt_shapes, i, r), device=device)
        b = TTMatrix(r, o, config.tt_rank, shape_for(config.tt_shapes, r, o), device=device)
        self.loretta_rep_A[adapter_name], self.loretta_rep_B[adapter_name] = a, b
        if config.init_mode == "noise_free":
            self.loretta_rep_A0[adapter_name], self.loretta_rep_B0[adapter_name] = a.frozen_copy(), b.frozen_copy()
        elif config.init_mode == "zero_core":  # W_B = 0, so delta W = 0: no copies needed (as LoRA's B = 0)
            b.zero_last_core()
        p = config.lora_dropout
        self.loretta_rep_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.lora_alpha / r
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(alpha/r) * (W_A W_B - W_A0 W_B0)^T`` in the base weight's ``(out, in)`` layout, fp32."""
        delta = self.loretta_rep_A[adapter_name].to_dense() @ self.loretta_rep_B[adapter_name].to_dense()
        if adapter_name in self.loretta_rep_A0:
            delta = delta - self.loretta_rep_A0[adapter_name].to_dense() @ self.loretta_rep_B0[adapter_name].to_dense()
        return (self.scaling[adapter_name] * delta).T

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The update ``(alpha/r) * (B(A(x)) - B0(A0(x)))`` in fp32 (``(alpha/r) * B(A(x))`` without copies).

        With the noise-free start, ``x`` meets both input factors in one ``2r``-wide product
        ``x [W_A | W_A0]`` (the dense factors, ``in x r``, are cheap to rebuild from the cores) instead of
        two narrow TT contractions, which are bandwidth-bound (measured in BENCHMARKS.md, adapter layers).
        The two halves then go through ``W_B`` and ``W_B0`` separately so that the start is exactly zero,
        not zero up to rounding.
        """
        x = self.loretta_rep_dropout[name](x.float())
        a, b, s = self.loretta_rep_A[name], self.loretta_rep_B[name], self.scaling[name]
        if name not in self.loretta_rep_A0:
            return s * b(a(x))
        with torch.no_grad():
            a0, b0 = self.loretta_rep_A0[name].to_dense(), s * self.loretta_rep_B0[name].to_dense()
        h = x @ torch.cat([a.to_dense(), a0], dim=1)
        r = h.shape[-1] // 2
        return h[..., :r] @ (s * b.to_dense()) - h[..., r:] @ b0


class Linear(DeltaLinearMixin, nn.Module, LorettaRepLayer):
    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: LorettaRepConfig, name: str = "") -> None:
        super().__init__()
        LorettaRepLayer.__init__(self, base_layer, name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __repr__(self) -> str:
        return "loretta_rep." + super().__repr__()


class LorettaRepHead(TTHead):
    """The TT classifier head of LoRETTA_rep (``tuners.tt_head``), saved under the method's prefix."""

    adapter_layer_names = ("loretta_rep_head",)
