"""Configuration of LoRETTA_rep: a LoRA-style update whose two factors are TT matrices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..common import LeanftConfig, LeanftPeftType
from ..tt_head import TTClassifierFields

INIT_MODES = ("noise_free", "zero_core", "reference")


@dataclass
class LorettaRepConfig(LeanftConfig, TTClassifierFields):
    """``delta W = (alpha / r) * TT(A) @ TT(B)`` on each target linear (``A: in x r``, ``B: r x out``).

    Defaults follow the LoRETTA reference (r 8, alpha 16, dropout 0.05; TT rank 8 and trainable norms,
    which the paper's LLaMA-2-7B count of 516,096 implies). The adapted model starts equal to the base
    model with ``init_mode="noise_free"`` (default) or ``"zero_core"``:

    * ``"noise_free"`` subtracts a frozen copy of the initial factors, ``delta = s * (B(A(x)) - B0(A0(x)))``
      (random factors, as the paper; but up to twice the adapter's forward FLOPs, and the copies double the
      saved factors);
    * ``"zero_core"`` zeroes the last TT core of ``B``, as LoRA zeroes its ``B``: ``delta W = 0`` exactly,
      no copies, no extra cost. That core's gradient is not zero (the other cores are random), and the
      rest follow once it has moved; weight decay pulls it towards zero, its start.
    * ``"reference"`` keeps the reference code's random, non-zero start.

    On sequence classification the classifier's hidden dense layer becomes a TT-linear at ``tt_rank`` and
    only the last projection trains densely, as in the papers (``tt_classifier``, ``tuners.tt_head``).

    ``tt_shapes`` overrides factor shapes by matrix size, e.g. ``{"4096x8": [16,16,8,4,4]}``.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank: width of the update"})
    lora_alpha: float = field(default=16, metadata={"help": "Update scale is lora_alpha / r"})
    tt_rank: int = field(default=8, metadata={"help": "TT rank of both factors"})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input"})
    init_mode: Literal["noise_free", "zero_core", "reference"] = field(
        default="noise_free", metadata={"help": f"Start: one of {INIT_MODES} (see the class docstring)"}
    )
    tt_shapes: dict[str, list[int]] | None = field(default=None, metadata={"help": "Explicit shapes by 'INxOUT'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanftPeftType.LORETTA_REP
        self._check_positive(r=self.r, tt_rank=self.tt_rank)
        self._check_dropout_and_init(self.lora_dropout, INIT_MODES)
