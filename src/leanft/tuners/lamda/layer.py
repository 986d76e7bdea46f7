"""LaMDA layer: ``y = W0 x + b0 + s * (P_B S - P_B0 S0) P_A x``; P_A frozen, S trained, P_B frozen on schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..common import DeltaLinearMixin, StartCopies, linear_features
from .config import LamdaConfig


def svd_start(weight: torch.Tensor, r: int, init: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P_A, P_B, S0)`` of ``init`` from the top-r SVD of ``weight`` (out x in), fp32.

    Each in its own row-major storage, as a loaded checkpoint is: LAPACK's column-major factors would
    give matmuls that round differently from the same values loaded with ``low_cpu_mem_usage``.
    """
    u, sigma, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    a, b, sigma = vh[:r], u[:, :r], sigma[:r]
    if init == "svd_identity":
        a, b, s0 = sigma.sqrt()[:, None] * a, b * sigma.sqrt(), torch.eye(r, device=weight.device) / scale
    else:
        s0 = torch.diag(sigma) / scale if init == "svd_residual" else torch.zeros(r, r, device=weight.device)
    return a.clone(memory_format=torch.contiguous_format), b.clone(memory_format=torch.contiguous_format), s0


class LamdaLayer(StartCopies, BaseTunerLayer):
    adapter_layer_names = ("lamda_S", "lamda_B")
    other_param_names = ("lamda_A", "lamda_B0", "lamda_S0", "lamda_B_frozen", "lamda_dropout", "r", "scaling",
                         "lamda_frozen", "freeze_order")
    # trainable S and P_B -> their SVD start (absent for svd_zero): weight decay pulls towards it
    start_copies = {"lamda_S": "lamda_S0", "lamda_B": "lamda_B0"}

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        self.base_layer = base_layer
        self.name = name
        self.in_features, self.out_features = linear_features(base_layer, name, "LaMDA")
        self.lamda_S, self.lamda_B = nn.ParameterDict(), nn.ParameterDict()
        # frozen and saved with the adapter: the projection P_A and the start P_B0, S0 that is subtracted
        self.lamda_A, self.lamda_B0, self.lamda_S0 = (BufferDict(persistent=True) for _ in range(3))
        self.lamda_B_frozen = BufferDict()  # copy of P_B's frozen columns while others still train
        self.lamda_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lamda_frozen: dict[str, int] = {}  # number of frozen P_B columns
        self.freeze_order: dict[str, str] = {}
        # adapters whose P_B is fully frozen: PEFT's set_adapter keeps them so (an instance dict, not the class's)
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    def update_layer(self, adapter_name: str, config: LamdaConfig, r: int) -> None:
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"LaMDA rank {r} exceeds the size {self.out_features} x {self.in_features} of {self.name}")
        weight = self.get_base_layer().weight
        scale = config.lamda_alpha / r
        if weight.is_meta:  # counting on the meta device: shapes only, no SVD possible
            shapes = ((r, self.in_features), (self.out_features, r), (r, r))
            a, b, s0 = (torch.empty(shape, device="meta") for shape in shapes)
        else:
            a, b, s0 = svd_start(weight, r, config.lamda_init, scale)
        self.lamda_A[adapter_name] = a
        self.lamda_B[adapter_name] = nn.Parameter(b.clone())
        self.lamda_S[adapter_name] = nn.Parameter(s0.clone())
        if config.lamda_init != "svd_zero":
            self.lamda_B0[adapter_name], self.lamda_S0[adapter_name] = b, s0
        p = config.lamda_dropout
        self.lamda_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scale
        self.lamda_frozen[adapter_name] = 0
        self.freeze_order[adapter_name] = config.freeze_order
        self.set_adapter(self.active_adapters)

    def frozen_columns(self, name: str) -> slice:
        """The frozen columns of P_B: the first ones for ``top_first`` (largest sigma), else the last."""
        r, f = self.r[name], self.lamda_frozen[name]
        return slice(0, f) if self.freeze_order[name] == "top_first" else slice(r - f, r)

    @torch.no_grad()
    def freeze_columns(self, name: str, count: int) -> None:
        """Freeze ``count`` columns of P_B for good (never fewer than before).

        Called after every optimiser step: the columns frozen earlier get zero gradient, yet AdamW's
        momentum and decoupled weight decay still move them, so they are first restored from their copy.
        Once all r are frozen, P_B leaves autograd and the optimiser (``requires_grad`` False, no grad).
        """
        b = self.lamda_B[name]
        if name in self.lamda_B_frozen:
            b[:, self.frozen_columns(name)] = self.lamda_B_frozen[name]
            del self.lamda_B_frozen[name]
        self.lamda_frozen[name] = max(self.lamda_frozen[name], min(count, self.r[name]))
        if 0 < self.lamda_frozen[name] < self.r[name]:
            self.lamda_B_frozen[name] = b[:, self.frozen_columns(name)].clone()
        elif self.lamda_frozen[name] == self.r[name]:
            b.requires_grad_(False)
            b.grad = None
            self.frozen_peft_weight_names[name] = ("lamda_B",)

    def update_matrix(self, name: str) -> torch.Tensor:
        """``s * (P_B S - P_B0 S0)`` (out x r), fp32; exactly zero at the start, so the start is the base model.

        P_B's frozen columns are detached: their gradient is zero and they cost no autograd work.
        """
        b, cols = self.lamda_B[name], self.frozen_columns(name)
        if b.requires_grad and cols.start < cols.stop:
            b = torch.cat([b[:, : cols.start], b[:, cols].detach(), b[:, cols.stop :]], dim=1)
        m = b @ self.lamda_S[name]
        if name in self.lamda_S0:
            m = m - self.lamda_B0[name] @ self.lamda_S0[name]
        return self.scaling[name] * m

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change to ``W0`` in its ``(out, in)`` layout, fp32: merged, ``W0`` becomes residual + update."""
        return self.update_matrix(adapter_name) @ self.lamda_A[adapter_name]

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``h M^T`` with ``h = P_A x`` and ``M = update_matrix``, in fp32.

        P_A is a buffer, so autograd keeps only P_A for ``h``'s backward (not ``x``) and the r-dimensional
        ``h`` for S's and P_B's gradients: the adapter path stores no d-dimensional activation.
        """
        h = F.linear(self.lamda_dropout[name](x.float()), self.lamda_A[name])
        return F.linear(h, self.update_matrix(name))


class Linear(DeltaLinearMixin, nn.Module, LamdaLayer):
    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: LamdaConfig, name: str = "", *,
                 r: int) -> None:
        super().__init__()
        LamdaLayer.__init__(self, base_layer, name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r)

    def __repr__(self) -> str:
        return "lamda." + super().__repr__()
