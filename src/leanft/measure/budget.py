"""What every run of a bench gets (``Budget``), and the size knob a rank sweep turns per method."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .. import methods
from ..models import default_device
from ..zo import make_optimizer, query_schedule


@dataclass(frozen=True)
class Budget:
    """What every run of a bench gets, so methods compare at equal data and compute.

    First-order runs train ``epochs`` over ``train`` examples at ``batch``; zeroth-order runs spend exactly
    ``forwards`` training forward passes (2 per SPSA query for most optimisers) at ``zo_batch`` with a
    constant lr. Both keep the checkpoint best on ``dev`` examples (none when 0). Every run evaluates on
    the same ``eval`` examples; evaluation forwards are not counted in the budget.
    """

    train: int = 1000
    dev: int = 500
    eval: int = 500
    epochs: float = 1.0
    batch: int = 8
    forwards: int = 400
    zo_batch: int = 16
    seed: int = 0


BUDGETS = {
    "smoke": Budget(train=8, dev=0, eval=8, batch=4, forwards=6, zo_batch=4),
    "quick": Budget(train=400, dev=100, eval=300, forwards=300),
    "standard": Budget(),
}
# The size knob a rank sweep turns, per method (the TT methods' size is set by their TT rank).
RANK_OPTION = {"lora": "rank", "mezo-lora": "rank", "lamda": "rank", "lamda++": "rank",
               "loretta-rep": "tt_rank", "loretta-adp": "tt_rank", "adazeta": "tt_rank"}
SHORT = {"rank": "r", "tt_rank": "tt"}


def parse_budget(spec: str) -> Budget:
    """A preset (``smoke``, ``quick``, ``standard``) optionally followed by overrides: ``quick,forwards=600``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    name = parts.pop(0) if parts and "=" not in parts[0] else "standard"
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; presets: {', '.join(BUDGETS)} (then key=value overrides)")
    kinds = {f.name: f.type for f in fields(Budget)}
    values: dict = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in kinds or not value:
            raise ValueError(f"bad budget entry {part!r}; expected key=value with key one of {', '.join(kinds)}")
        values[key] = float(value) if kinds[key] == "float" else int(value)
    budget = replace(BUDGETS[name], **values)
    if budget.forwards % 2 or budget.forwards <= 0:
        raise ValueError(f"forwards={budget.forwards}: the zeroth-order budget must be a positive even number "
                         "(each query costs two forward passes)")
    return budget


def default_rank(method: str, task_type: str) -> int | None:
    """The value of the method's sweep knob in its default config (None for full fine-tuning / MeZO)."""
    option = RANK_OPTION.get(method)
    if option is None:
        return None
    return getattr(methods.make_config(method, task_type), methods.OPTION_FIELDS[method][option])


def default_dtype() -> str:
    """Weights dtype of a bench: bfloat16 on CUDA (how GPUs train), float32 on CPU (bf16 matmuls are slow there)."""
    return "bfloat16" if default_device().type == "cuda" else "float32"




def zo_spend(forwards: int, train: int, batch: int, optimizer: str, queries: int, adazeta: bool) -> tuple[int, int]:
    """``(steps, forwards spent)`` of a zeroth-order run under ``leanft train --max-forwards forwards``, worked
    out as ``optim.ZerothOrder`` cuts its steps: each step takes the schedule's queries (``queries``, or
    AdaZeta's per-epoch count when ``adazeta``), the last ones cut to what is left, and the run stops when
    not even the optimiser's fewest queries fit. The bench needs it before training: to check that every
    optimiser spends the budget exactly, and to space the dev evaluations along the run."""
    opt = make_optimizer(optimizer)
    per_epoch = max(1, math.ceil(train / batch))
    steps = spent = 0

    def schedule(epoch: int) -> int:
        return query_schedule(epoch) if adazeta else queries

    while opt.fitting(schedule(0), spent, forwards) >= opt.min_queries:
        spent += opt.forwards(opt.fitting(schedule(steps // per_epoch), spent, forwards))
        steps += 1
    return steps, spent


def eval_every(steps: int, points: int = 15) -> int:
    """Steps between dev evaluations so that a run of ``steps`` steps has about ``points`` of them (10-20)."""
    return max(1, math.ceil(steps / points))
