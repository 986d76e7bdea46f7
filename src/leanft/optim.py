"""How a step updates the model: AdamW (``FirstOrder``) or SPSA (``ZerothOrder``), behind one interface.

Both take ``step(step, epoch, micro_batches) -> row``: they compute ``objective(net, micro_batch)`` for
each micro-batch, update the trainable parameters of ``model`` and return what the step did (its loss,
the parameters it updated, and for SPSA its query count and projected gradient). Training, the
benchmarks (``leanft steps``, ``leanft memory``) and the memory estimator's check all step through
these two classes, so how a step runs is written once.

Weight decay follows a structural rule: tensors of two or more dimensions (weight matrices, TT cores,
LaMDA's core) decay; vectors (biases, normalisation scales) do not, in AdamW and in SPSA alike. A
tensor whose method starts it away from zero (a frozen start copy: LoRETTA's noise-free start, LaMDA's
SVD start) decays towards that start, not towards zero, which would pull the model away from the
pretrained one (``start_anchors``).

Low precision: the objective runs under ``autocast`` (``leanft.precision``); float16 first-order steps
scale the loss with a ``GradScaler``.

First-order steps clip the gradient's total norm at ``max_grad_norm`` (1.0, the HF Trainer's default,
which the papers' reference codes train with) and stop on a non-finite gradient as on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from .tuners.common import StartCopies
from .tuners.lamda.schedule import lamda_tuner
from .zo import ZOEngine
from .zo.optimizers import SGD

Objective = Callable[[nn.Module, Any], torch.Tensor]


def decays(param: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices and higher-order tensors yes, biases and norm scales no."""
    return param.ndim >= 2


def start_anchors(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(param) -> its frozen start`` for adapter tensors whose start is not zero (``StartCopies`` layers)."""
    anchors = {}
    for layer in model.modules():
        if isinstance(layer, StartCopies):
            anchors.update(layer.start_anchors())
    return anchors


def param_groups(model: nn.Module, weight_decay: float, anchored: dict[int, torch.Tensor]) -> list[dict]:
    """AdamW groups: trainable tensors that decay towards zero; those that decay towards their start
    (``anchored``; AdamW's own decay off, ``towards_start`` applied by ``FirstOrder``); those that do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if decays(p) and id(p) not in anchored], "weight_decay": weight_decay},
            {"params": [p for p in trainable if decays(p) and id(p) in anchored], "weight_decay": 0.0,
             "towards_start": weight_decay},
            {"params": [p for p in trainable if not decays(p)], "weight_decay": 0.0}]


def trainable_now(model: nn.Module) -> int:
    """Parameters the next update changes (LaMDA counts only P_B's columns not yet frozen)."""
    tuner = lamda_tuner(model)
    if tuner is not None:
        return int(tuner.trainable_counts()["total"])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def after_step(model: nn.Module, total_steps: int) -> Callable[[int], None]:
    """What a method does after each optimiser step, given the steps done: LaMDA freezes P_B's columns
    on its schedule; other methods do nothing."""
    tuner = lamda_tuner(model)
    if tuner is not None:
        return lambda done: tuner.update_freezing(done, total_steps)
    return lambda done: None


class FirstOrder:
    """AdamW with a learning-rate schedule and gradient accumulation; data-parallel through DDP.

    ``net`` computes the objective; ``model`` owns the trainable parameters. With several processes
    (``accelerator.num_processes > 1``) ``net`` is wrapped in DDP, gradients are all-reduced on the last
    micro-batch of a step only (``no_sync`` before it), and the wrapper is rebuilt when the method changes
    which parameters train (LaMDA's fully frozen P_B), since DDP expects a gradient for every parameter it
    was built with. ``method_schedule=False`` keeps a method's own schedule still (a measurement of one
    phase of LaMDA). ``max_grad_norm`` clips the gradient's total norm as the HF Trainer does (0: no clipping).
    """

    shard = True  # each process trains on its own slice of the global batch
    random = True  # dropout draws from each process's RNG: a checkpoint keeps every process's states
    kind = "first-order (AdamW)"

    def __init__(self, model: nn.Module, net: nn.Module, objective: Objective, lr: float, *, weight_decay: float = 0.0,
                 scheduler: str = "constant", warmup_steps: int = 0, total_steps: int = 1, accelerator=None,
                 method_schedule: bool = True, autocast: Callable = contextlib.nullcontext,
                 scaler: torch.amp.GradScaler | None = None, max_grad_norm: float = 1.0) -> None:
        self.max_grad_norm = max_grad_norm
        self.anchors = start_anchors(model) if weight_decay else {}
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay, self.anchors), lr=lr)
        self.autocast, self.scaler = autocast, scaler
        self.scheduler = get_scheduler(scheduler, self.optimizer, warmup_steps, total_steps)
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.device = accelerator.device if accelerator is not None else None
        self.model, self.objective, self.net = model, objective, net
        self._wrap()
        self.after_step = after_step(model, total_steps) if method_schedule else (lambda done: None)
        self.forwards = 0  # forward passes taken, one per micro-batch

    def _wrap(self) -> None:
        """(Re)build the DDP wrapper over the parameters that train now (several processes only)."""
        self.training = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        if self.world == 1:
            return
        module = self.net.module if isinstance(self.net, DistributedDataParallel) else self.net
        self.net = None  # the old wrapper's gradient hooks go with it
        ids = [self.device.index] if self.device.type == "cuda" else None
        # constant buffers (rotary tables, frozen start copies): no broadcast, which is a collective per
        # forward and would hang when processes run different numbers of forwards (a mixed-task batch)
        self.net = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def _method_schedule(self, done: int) -> None:
        self.after_step(done)
        if tuple(n for n, p in self.model.named_parameters() if p.requires_grad) != self.training:
            self._wrap()

    def _losses_everywhere(self, loss: torch.Tensor) -> list[float]:
        """This micro-batch's loss on every process (one scalar all-gather), so that all stop together."""
        if self.world == 1:
            return [float(loss.detach())]
        mine = loss.detach().float().reshape(1)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return [float(x) for x in every]

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, step: int, epoch: int, micro_batches: list) -> dict:
        """Forward and backward of every micro-batch (gradients averaged), clipping, then one AdamW update.
        A non-finite loss on any process stops every process before any update: the row then has the
        ``nonfinite`` processes and their losses. So does a non-finite gradient behind finite losses (the
        row's ``nonfinite`` is ``"gradient"``), except in float16, where the scaler skips that step."""
        self.net.train()
        self.forwards += len(micro_batches)
        losses = []
        for m, batch in enumerate(micro_batches):
            last = m == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.net.no_sync()
            with sync:
                with self.autocast():
                    loss = self.objective(self.net, batch)
                everywhere = self._losses_everywhere(loss)
                bad = {rank: x for rank, x in enumerate(everywhere) if not math.isfinite(x)}
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    return {"loss": next(iter(bad.values())), "nonfinite": bad, "micro_batch": m}
                scaled = loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(sum(everywhere) / len(everywhere))
        average = sum(losses) / len(losses)
        grad_norm = self._clip_gradients()
        if self.scaler is None and not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": average, "grad_norm": grad_norm, "nonfinite": "gradient"}
        if self.scaler is None:
            self.optimizer.step()
            stepped = True
        else:  # float16: the scaler skips a step whose gradients overflowed, and lowers its scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        if stepped:
            self._decay_towards_start()
        self.optimizer.zero_grad(set_to_none=True)
        if not stepped:  # as the Trainer does: the schedule waits for a step that was taken
            return {"loss": average, "updated_params": 0, "skipped": True}
        self.scheduler.step()
        updated = trainable_now(self.model)
        self._method_schedule(step + 1)
        return {"loss": average, "grad_norm": grad_norm, "updated_params": updated}

    def _clip_gradients(self) -> float:
        """The total gradient norm, before clipping it to ``max_grad_norm`` (float16: unscaled first).

        DDP has all-reduced the gradients by now, so every process clips alike, and a non-finite gradient
        on one process is non-finite on all of them. LaMDA's frozen columns have zero gradient: they add
        nothing to the norm.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params])
        value = float(norm)  # one host sync
        if self.max_grad_norm and math.isfinite(value):
            nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return value

    @torch.no_grad()
    def _decay_towards_start(self) -> None:
        """``theta <- theta - lr * wd * (theta - theta_0)`` for the tensors anchored at their start that
        AdamW just updated: as its own decay, none for a tensor without a gradient (LaMDA's P_B once
        wholly frozen, which must stay exactly as it froze)."""
        for group in self.optimizer.param_groups:
            if group.get("towards_start"):
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(group["lr"] * group["towards_start"] * (p - self.anchors[id(p)]))

    def state_dict(self) -> dict:
        """AdamW's moments, the lr schedule, the loss scaler and the forward passes taken: with the trainable
        tensors and each process's RNG states (the run folder saves those), a resume continues exactly."""
        state = {"kind": self.kind, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "forwards": self.forwards}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict, step: int) -> None:
        """``state_dict()``'s state back, at the loop's ``step``, where the method's schedule is re-applied
        (LaMDA's freezing)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.forwards = state["forwards"]
        self._method_schedule(step)


class ZerothOrder:
    """SPSA through ``zo.ZOEngine``: forward passes only, in eval mode, every process on the same batch
    with the queries split between processes.

    ``queries(epoch)`` is the schedule's query count; with ``max_forwards`` the last step's queries are
    cut so the run spends exactly that many forward passes (one fewer when a step's overflow check, a
    forward of its own, left an odd number). A row's ``forwards`` are those of its step, its ``lr`` the one
    the step used (the schedule's, halved after a rollback until the guard doubles it back). ``stage`` (of a
    sequential run) is part of every query's seed.
    """

    shard = False
    random = False  # directions come from seeds, in eval mode: no RNG state to keep
    kind = "zeroth-order"

    def __init__(self, model: nn.Module, net: nn.Module, objective: Objective, lr: float, *, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, blowup: float = 0.0, recover: int = 10,
                 max_rollbacks: int = 5, queries: Callable[[int], int] = lambda epoch: 1, max_forwards: int = 0,
                 scheduler: str = "constant", warmup_steps: int = 0, total_steps: int = 1,
                 autocast: Callable = contextlib.nullcontext, stage: int = 0, optimizer: SGD | None = None) -> None:
        optimizer = optimizer if optimizer is not None else SGD()
        if max_forwards % 2 and not optimizer.one_sided and not optimizer.center:
            raise ValueError(f"--max-forwards {max_forwards} is odd: each zeroth-order query costs 2 forward "
                             "passes, so only an even budget can be spent exactly")
        self.engine = ZOEngine(model, eps=eps, weight_decay=weight_decay, seed=seed, blowup=blowup, recover=recover,
                               max_rollbacks=max_rollbacks, decays=decays,
                               anchors=start_anchors(model) if weight_decay else None, stage=stage,
                               optimizer=optimizer)
        self.autocast = autocast
        self.dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)  # carries the lr schedule
        self.scheduler = get_scheduler(scheduler, self.dummy, warmup_steps, total_steps)
        self.model, self.net, self.objective = model, net, objective
        self.schedule, self.max_forwards, self.forwards = queries, max_forwards, 0

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def queries(self, epoch: int) -> int:
        """The schedule's query count, cut so the step fits what is left of ``max_forwards``."""
        q = self.schedule(epoch)
        return self.engine.optimizer.fitting(q, self.forwards, self.max_forwards) if self.max_forwards else q

    def fits(self) -> bool:
        """Whether another step fits in ``max_forwards`` (always, without a budget)."""
        return self.queries(0) >= self.engine.optimizer.min_queries if self.max_forwards else True

    def step(self, step: int, epoch: int, micro_batches: list) -> dict:
        if len(micro_batches) != 1:
            raise ValueError("zeroth-order training takes one batch per step: use --batch-size, not --grad-accum")
        self.net.eval()  # dropout off during the perturbed forwards
        def loss_fn() -> float:
            with self.autocast():
                return float(self.objective(self.net, micro_batches[0]))

        record = self.engine.step(step, loss_fn, self.queries(epoch), self.lr())
        spent = self.engine.last_forwards
        self.forwards += spent
        self.dummy.step()
        self.scheduler.step()
        return {"loss": record.loss, "lr": record.lr, "queries": len(record.seeds), "forwards": spent,
                "projected_grad": float(np.mean(record.grads)),
                "updated_params": 0 if record.rolled_back else self.engine.numel,
                **({"rolled_back": True, "diverged": self.engine.why} if record.rolled_back else {})}

    def state_dict(self) -> dict:
        """The engine's state, the lr schedule and the forward passes spent: with the trainable tensors, a
        resume continues exactly (directions come from seeds; no RNG state is involved)."""
        return {"kind": self.kind, "engine": self.engine.state_dict(), "scheduler": self.scheduler.state_dict(),
                "forwards": self.forwards}

    def load_state_dict(self, state: dict, step: int) -> None:
        """``state_dict()``'s state back (``step``: the loop's, which the engine's state does not depend on)."""
        self.engine.load_state_dict(state["engine"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.forwards = state["forwards"]
