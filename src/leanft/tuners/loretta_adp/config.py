"""Configuration of LoRETTA_adp: bottleneck adapters whose projections are TT matrices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..common import LeanftConfig, LeanftPeftType
from ..tt_head import TTClassifierFields

INIT_MODES = ("noise_free", "zero_core", "reference")


@dataclass
class LorettaAdpConfig(LeanftConfig, TTClassifierFields):
    """Adapter ``A(u) = s * U(act(D(dropout(u))))``, ``D: h -> b`` and ``U: b -> h`` TT matrices with bias.

    Placement follows the reference: an *output* adapter adds ``A(v)`` to a layer's output ``v``; an
    *input* adapter feeds ``x + A(x)`` to the layer. LLaMA-like models get input adapters on ``gate_proj``
    and ``up_proj`` and an output adapter on ``down_proj`` (3 per layer); BERT-like models get output
    adapters after the attention-output and FFN-output dense layers (2 per layer); other architectures the
    same after their attention and feed-forward outputs where these are recognisably named (OPT's
    ``out_proj`` and ``fc2``, ...). Defaults come from module names (``tuners.targets``); else pass
    ``target_modules`` (output adapters; list ``input_modules`` for input ones).

    On sequence classification the classifier's hidden dense layer becomes a TT-linear at ``tt_rank`` and
    only the last projection trains densely, as in the papers (``tt_classifier``, ``tuners.tt_head``):
    RoBERTa-/DeBERTa-base then train 99,194 parameters, the paper's 0.10 M.

    Defaults are the paper's (bottleneck 64, TT rank 5, ReLU, scaling 1, trainable norms: the LLaMA-2-7B
    count of 876,800). The adapted model starts equal to the base model with ``init_mode="zero_core"``
    (default; as accurate as the paper's start or better on SmolLM2 SST-2 and cheaper, see BENCHMARKS.md)
    or ``"noise_free"``:

    * ``"zero_core"`` zeroes the last TT core and the bias of the up-projection ``U``, as LoRA zeroes its
      ``B``: ``A(u) = 0`` exactly, no copies, no extra cost. ``U``'s last core and bias get non-zero
      gradients at once (``D`` and ``U``'s other cores are random), ``D`` once they have moved; weight decay
      pulls towards zero, their start.
    * ``"noise_free"`` subtracts a frozen copy of the initial adapter, ``A(u) - A0(u)`` (random
      projections, as the paper; but twice the adapter's forward FLOPs, and the copies double the saved
      adapter). AdaZeta keeps this start: the two were compared under first-order training only.
    * ``"reference"`` keeps the reference code's random start.
    """

    bottleneck_size: int = field(default=64, metadata={"help": "Adapter bottleneck width b"})
    tt_rank: int = field(default=5, metadata={"help": "TT rank of both projections"})
    non_linearity: str = field(default="relu", metadata={"help": "Activation name from transformers' ACT2FN"})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier s of the adapter output"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input"})
    input_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Targets that get an input (pre-linear) adapter; None = architecture default"},
    )
    init_mode: Literal["noise_free", "zero_core", "reference"] = field(
        default="zero_core", metadata={"help": f"Start: one of {INIT_MODES} (see the class docstring)"}
    )
    tt_shapes: dict[str, list[int]] | None = field(default=None, metadata={"help": "Explicit shapes by 'INxOUT'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanftPeftType.LORETTA_ADP
        self._check_positive(bottleneck_size=self.bottleneck_size, tt_rank=self.tt_rank)
        self._check_dropout_and_init(self.adapter_dropout, INIT_MODES)
        from transformers.activations import ACT2FN

        if self.non_linearity not in ACT2FN:
            raise ValueError(f"unknown non_linearity {self.non_linearity!r}; choose one of {sorted(ACT2FN)}")
