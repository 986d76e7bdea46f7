"""Mixed precision the standard way: trainable parameters in float32, low-precision compute by autocast.

The base model may be loaded in bfloat16 or float16 (``--dtype``); every parameter that trains is then
made float32 (``upcast_trainable``), so small updates are not lost to rounding, and the forward runs
under ``torch.autocast`` on CUDA and CPU alike (``Precision.autocast``). float16 first-order training
scales the loss (``Precision.scaler``, a ``torch.amp.GradScaler``) so small gradients do not underflow.
Full fine-tuning in low precision therefore keeps float32 master weights (the whole model becomes
float32, computing in the low dtype). The one exception is full-model zeroth-order training (MeZO),
whose point is inference memory: it keeps the low-precision weights and rounds its perturbations and
updates stochastically (``leanft.zo.stochastic_round``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of ``--dtype``; an unknown name is an error that lists the valid ones."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def upcast_trainable(model: nn.Module) -> nn.Module:
    """Make every trainable low-precision parameter float32 (norms in ``modules_to_save``, heads, the
    whole model for full fine-tuning); frozen weights keep their dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return model


@dataclass(frozen=True)
class Precision:
    """How a run computes: the base model's ``dtype`` on ``device``."""

    dtype: str = "float32"
    device: str = "cpu"

    @property
    def low(self) -> torch.dtype | None:
        return None if self.dtype == "float32" else dtype_of(self.dtype)

    def autocast(self):
        """The forward's context: ``torch.autocast`` to the low dtype, or nothing in float32."""
        if self.low is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.low)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for float16 first-order training (bfloat16 has float32's range and needs none)."""
        return torch.amp.GradScaler(self.device) if self.low is torch.float16 else None
