"""LaMDA's two schedules: which columns of P_B are frozen after each step, and LaMDA++'s per-layer ranks
from the spectra of the pretrained weights."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ..common import linear_features
from ..targets import attention_targets
from .config import LamdaConfig


def frozen_count(r: int, step: int, total_steps: int, freeze_fraction: float) -> int:
    """``min(r, floor(r k / (freeze_fraction T)))`` frozen columns after ``k = step`` of ``T`` steps.

    Exact arithmetic on the fraction as written, so that 0.3 of 10 steps is 3 steps, not 3.0000000000000004.
    """
    if total_steps <= 0 or step < 0:
        raise ValueError(f"update_freezing needs 0 <= step and total_steps > 0, got {step} and {total_steps}")
    return min(r, math.floor(r * step / (Fraction(str(freeze_fraction)) * total_steps)))


def spectral_k(weight: torch.Tensor, threshold: float) -> int:
    """The fewest singular values of ``weight`` that hold ``threshold`` of its energy ``sum sigma_i^2``."""
    energy = torch.linalg.svdvals(weight.detach().float()).square()
    cumulative = energy.cumsum(0) / energy.sum()
    return min(int((cumulative < threshold).sum()) + 1, len(energy))


def allocate(weights: list[int], budget: int, low: list[int], high: list[int]) -> list[int]:
    """Integers proportional to ``weights``, each within ``[low, high]``, that sum to ``budget`` exactly.

    The clamped proportional split ``x_l = clamp(c w_l, low_l, high_l)`` is piecewise linear in ``c``, so
    ``sum x_l = budget`` is solved exactly between its breakpoints; each ``x_l`` is then rounded down and
    the remainder goes one by one to the largest fractional parts (largest-remainder rounding).
    """
    if not sum(low) <= budget <= sum(high):
        raise ValueError(f"LaMDA++ rank budget {budget} is outside [{sum(low)}, {sum(high)}], the range that "
                         "r_min, r_max and the matrix sizes allow for these targets")

    def split(c: Fraction) -> list[Fraction]:
        return [min(max(c * w, Fraction(lo)), Fraction(hi)) for w, lo, hi in zip(weights, low, high)]

    below = Fraction(0)
    for above in sorted({Fraction(bound, w) for w, lo, hi in zip(weights, low, high) for bound in (lo, hi)}):
        if sum(split(above)) >= budget:
            break
        below = above
    at_below, at_above = sum(split(below)), sum(split(above))
    c = below if at_above == at_below else below + (above - below) * (budget - at_below) / (at_above - at_below)
    shares = split(c)
    ranks = [math.floor(x) for x in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (ranks[i] - shares[i], -weights[i], i))
    for i in by_remainder[: budget - sum(ranks)]:
        ranks[i] += 1
    return ranks


def lamda_ranks(model: nn.Module, config: LamdaConfig) -> dict[str, int]:
    """Rank of each target module of ``model`` (the transformers model, not yet adapted) under ``config``.

    ``rank_pattern`` if the config has one, else ``r`` everywhere (``"uniform"``) or LaMDA++'s allocation
    from the weight spectra (``"spectrum"``; needs real weights). Injects nothing, changes no config.
    """
    config = copy.copy(config)
    if config.target_modules is None:  # LoRA's q and v, so that comparisons with LoRA are at equal placement
        config.target_modules = attention_targets(model, "LaMDA")
    targets = {name: m for name, m in model.named_modules() if name and check_target_module_exists(config, name)}
    if config.rank_pattern is not None or config.rank_allocation == "uniform":
        return {name: (config.rank_pattern or {}).get(name, config.r) for name in targets}
    ks, high = [], []
    for name, module in targets.items():
        size = min(linear_features(module, name, "LaMDA"))
        if module.weight.is_meta:
            raise ValueError(f"LaMDA++ rank allocation needs the model's weights; {name} is on the meta device")
        ks.append(spectral_k(module.weight, config.energy_threshold))
        high.append(min(size, config.r_max or size))
    budget = config.rank_budget or config.r * len(targets)
    return dict(zip(targets, allocate(ks, budget, [config.r_min] * len(ks), high)))


def lamda_tuner(model: nn.Module):
    """The LaMDA tuner of a PEFT model (the one tuner with a schedule of its own, ``update_freezing``), or None."""
    tuner = getattr(model, "base_model", None)
    return tuner if hasattr(tuner, "update_freezing") else None
