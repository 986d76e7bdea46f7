"""Zeroth-order training: the SPSA engine (``engine``), its optimisers (``optimizers``), the seeded random
numbers it perturbs with (``noise``) and how a perturbed forward computes (``compute``)."""

from .engine import OVERFLOW, ZOEngine, ZOStep, device_types, query_schedule, query_seed
from .noise import BLOCK, DIRECTIONS, stochastic_round
from .optimizers import OPTIMIZERS, OPTIONS, make_optimizer

__all__ = ["BLOCK", "DIRECTIONS", "OPTIMIZERS", "OPTIONS", "OVERFLOW", "ZOEngine", "ZOStep", "device_types",
           "make_optimizer", "query_schedule", "query_seed", "stochastic_round"]
