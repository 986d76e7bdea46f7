"""Configuration of LaMDA and LaMDA++: a frozen SVD sandwich around a small trainable r x r matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..common import LeanftConfig, LeanftPeftType

INITS = ("svd_residual", "svd_zero", "svd_identity")
FREEZE_ORDERS = ("top_first", "bottom_first")
ALLOCATIONS = ("uniform", "spectrum")


@dataclass
class LamdaConfig(LeanftConfig):
    """``y = W0 x + s * (P_B S - P_B0 S0) P_A x`` on each target linear, ``s = lamda_alpha / r``.

    From the pretrained ``W0 = U Sigma V^T`` (sigma descending), ``lamda_init`` chooses the start:

    * ``"svd_residual"`` (default): ``P_A = V_r^T``, ``P_B = U_r``, ``S0 = Sigma_r / s``. The frozen
      start ``s * P_B0 S0 P_A = U_r Sigma_r V_r^T`` is subtracted, so the base acts as the residual
      ``W0 - U_r Sigma_r V_r^T`` and training adapts the top-r principal part (PiSSA-like).
    * ``"svd_zero"``: same projections, ``S0 = 0``; the base is ``W0`` and nothing is subtracted.
    * ``"svd_identity"``: ``P_A = Sigma_r^(1/2) V_r^T``, ``P_B = U_r Sigma_r^(1/2)``, ``S0 = I / s``,
      residual base as in ``svd_residual``.

    The subtraction happens in the adapter path rather than in ``W0``, which is never modified: every
    start reproduces the pretrained outputs exactly, a bf16 base loses nothing, and loading rebuilds the
    residual from the saved ``P_A``, ``P_B0`` and ``S0`` without re-running the SVD (whose signs are
    ambiguous). ``merge`` writes the residual plus the update into the weight.

    ``P_A`` is always frozen and ``S`` always trained. ``P_B`` trains at first, then its columns (one
    per singular direction) freeze on schedule: after ``k`` of ``T`` optimiser steps ``min(r, floor(r k
    / (freeze_fraction T)))`` columns are frozen, column 0 (largest sigma) first for ``"top_first"``,
    column r-1 first for ``"bottom_first"``; see ``LamdaModel.update_freezing``.

    LaMDA++ (``rank_allocation="spectrum"``): for each target matrix ``k_l`` = the fewest singular
    values holding ``energy_threshold`` of ``sum sigma_i^2``; ranks proportional to ``k_l`` (a flatter
    spectrum gets more rank), clamped to ``[r_min, r_max]`` (and the matrix size), summing exactly to
    ``rank_budget`` (default ``r`` times the number of targets): the clamped proportional split is solved
    exactly, then rounded down with the remainder going to the largest fractional parts. The result is
    stored in ``rank_pattern`` (full module name -> rank), so a saved adapter reloads with the same
    ranks. ``lamda_alpha`` is not scaled with the rank: each module uses ``s = lamda_alpha / r_l``, as
    LoRA does with a rank pattern.

    Defaults: r 8 (same rank as LoRA r 8), alpha 16, no dropout, LoRA's default targets (q and v), norms
    frozen (LaMDA trains only S and, early on, P_B).
    """

    r: int = field(default=8, metadata={"help": "Rank: size of the trainable r x r matrix S"})
    lamda_alpha: float = field(default=16, metadata={"help": "Update scale is lamda_alpha / r"})
    lamda_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input"})
    lamda_init: Literal["svd_residual", "svd_zero", "svd_identity"] = field(default="svd_residual")
    freeze_fraction: float = field(
        default=0.3, metadata={"help": "P_B is fully frozen after this fraction of the optimiser steps, in (0, 1]"}
    )
    freeze_order: Literal["top_first", "bottom_first"] = field(
        default="top_first", metadata={"help": "Which singular directions of P_B freeze first"}
    )
    rank_allocation: Literal["uniform", "spectrum"] = field(
        default="uniform", metadata={"help": "'spectrum' = LaMDA++: per-module ranks from the weight spectra"}
    )
    rank_budget: int | None = field(
        default=None, metadata={"help": "LaMDA++: total rank over all targets; None = r * number of targets"}
    )
    energy_threshold: float = field(
        default=0.9, metadata={"help": "LaMDA++: spectral energy fraction that defines each module's k_l"}
    )
    r_min: int = field(default=1, metadata={"help": "LaMDA++: smallest rank of a module"})
    r_max: int | None = field(default=None, metadata={"help": "LaMDA++: largest rank; None = the matrix size"})
    rank_pattern: dict[str, int] | None = field(
        default=None, metadata={"help": "Rank per full module name (filled in by LaMDA++); others use r"}
    )
    train_norms: bool = field(default=False, metadata={"help": "Train all normalisation layers (not in LaMDA)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanftPeftType.LAMDA
        self._check_positive(r=self.r, r_min=self.r_min)
        if self.rank_budget is not None:
            self._check_positive(rank_budget=self.rank_budget)
        if self.r_max is not None:
            self._check_positive(r_max=self.r_max)
            if self.r_max < self.r_min:
                raise ValueError(f"LamdaConfig: r_max {self.r_max} is smaller than r_min {self.r_min}")
        if not 0 <= self.lamda_dropout < 1:
            raise ValueError(f"LamdaConfig: lamda_dropout must be in [0, 1), got {self.lamda_dropout}")
        if not 0 < self.freeze_fraction <= 1:
            raise ValueError(f"LamdaConfig: freeze_fraction must be in (0, 1], got {self.freeze_fraction}")
        if not 0 < self.energy_threshold <= 1:
            raise ValueError(f"LamdaConfig: energy_threshold must be in (0, 1], got {self.energy_threshold}")
        for name, value, allowed in (("lamda_init", self.lamda_init, INITS),
                                     ("freeze_order", self.freeze_order, FREEZE_ORDERS),
                                     ("rank_allocation", self.rank_allocation, ALLOCATIONS)):
            if value not in allowed:
                raise ValueError(f"LamdaConfig: {name} must be one of {allowed}, got {value!r}")
