"""Zeroth-order training: SPSA with the seed trick (MeZO), several queries per step, AdaZeta's schedule.

One step on a batch with ``Q`` queries: for each query ``q`` draw a seed, perturb the trainable
parameters by ``+eps z_q`` and ``-eps z_q`` (``z_q ~ N(0, I)`` regenerated from the seed, never stored),
take the two losses, and form the projected gradient ``p_q = (l+ - l-) / (2 eps)``. The update is
``theta <- theta - lr * (mean_q p_q z_q + wd * theta)``, decay only where ``decays(param)`` says so.
Only forward passes run (no autograd graph, no optimiser state), in eval mode, so memory stays at that
of inference plus, for small trainable sets, one copy of them.

Choices where the sources leave room (all configurable):

* ``z`` comes from a dedicated ``torch.Generator`` seeded per query (never the global RNG); seeds are
  a deterministic function of (run seed, step, query index), so ranks draw distinct directions and a
  distributed run equals a single-process run with the same seeds.
* Exact restore: small trainable sets (``<= copy_limit`` elements) are snapshotted and perturbed from the
  snapshot, so parameters come back bit-for-bit in any dtype; larger sets (full-model MeZO) are
  perturbed in place (``+eps z, -2 eps z, +eps z``), which may drift by rounding, as in MeZO.
* Divergence: a step whose loss is non-finite or exceeds ``blowup`` times its running mean rolls back to
  the last good parameters and halves the learning rate (small sets; large ones stop with an error).
* Replay: every step is logged as (seeds, projected gradients, lr); the start state plus the log
  rebuilds the exact parameters (``replay``), which is how a ZO run resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def query_schedule(epoch: int, alpha: float = 0.85, beta: float = 0.45, q_max: int = 20, q_min: int = 1) -> int:
    """AdaZeta's query number for an epoch: ``min(max(floor(alpha * epoch**beta), q_min), q_max)``."""
    return min(max(math.floor(alpha * epoch**beta), q_min), q_max)


def query_seed(run_seed: int, step: int, query: int) -> int:
    """The seed of query ``query`` at ``step``: independent streams, reproducible anywhere."""
    return int(np.random.SeedSequence([run_seed, step, query]).generate_state(1)[0])


@dataclass
class ZOStep:
    """What one step did: enough to replay it."""

    step: int
    seeds: list[int]
    grads: list[float]  # projected gradients, in query order
    lr: float
    loss: float  # mean l+ over the queries
    rolled_back: bool = False


class ZOEngine:
    """SPSA over the parameters of ``model`` that require grad (order fixed at construction)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        copy_limit: int = 50_000_000,
        blowup: float = 10.0,
        decays: Callable[[torch.Tensor], bool] = lambda param: True,
    ) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("zeroth-order training needs trainable parameters; the model has none")
        self.params = [p for _, p in self.named]
        self.decay = [weight_decay if decays(p) else 0.0 for p in self.params]
        self.eps, self.seed, self.blowup = eps, seed, blowup
        self.numel = sum(p.numel() for p in self.params)
        self.exact = self.numel <= copy_limit
        self.snapshot = [p.detach().clone() for p in self.params] if self.exact else None
        self.good = [p.detach().clone() for p in self.params] if self.exact else None
        self.running_loss: float | None = None
        self.lr_scale = 1.0  # halved at every rollback

    # -- perturbation ------------------------------------------------------------------------------

    def _directions(self, seed: int):
        """``z`` for each parameter, regenerated from ``seed`` in a fixed order (fp32)."""
        gens: dict[torch.device, torch.Generator] = {}
        for p in self.params:
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            yield torch.randn(p.shape, generator=gens[p.device], device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def _set(self, seed: int, scale: float) -> None:
        """Parameters := snapshot + scale * eps * z (exact mode) or += scale * eps * z (in place)."""
        for i, (p, z) in enumerate(zip(self.params, self._directions(seed))):
            if self.exact:
                p.copy_(self.snapshot[i].float() + scale * self.eps * z)
            else:
                p.add_((scale * self.eps * z).to(p.dtype))

    @torch.no_grad()
    def projected_gradient(self, seed: int, loss_fn: Callable[[], float]) -> tuple[float, float]:
        """``(p, l+)`` of one query; parameters are restored afterwards."""
        if self.exact:
            for s, p in zip(self.snapshot, self.params):
                s.copy_(p)
        self._set(seed, +1.0)
        plus = loss_fn()
        self._set(seed, -1.0 if self.exact else -2.0)
        minus = loss_fn()
        if self.exact:
            for s, p in zip(self.snapshot, self.params):
                p.copy_(s)
        else:
            self._set(seed, +1.0)
        return (plus - minus) / (2 * self.eps), plus

    # -- update ------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """``theta <- theta - lr * (mean_q p_q z_q + wd * theta)``, z regenerated from the seeds."""
        q = len(seeds)
        for p, wd in zip(self.params, self.decay):
            if wd:
                p.mul_(1 - lr * wd)
        if self.exact:  # accumulate in fp32, one rounding per parameter
            acc = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            for seed, g in zip(seeds, grads):
                for a, z in zip(acc, self._directions(seed)):
                    a.add_(z, alpha=g / q)
            for p, a in zip(self.params, acc):
                p.copy_(p.float() - lr * a)
        else:
            for seed, g in zip(seeds, grads):
                for p, z in zip(self.params, self._directions(seed)):
                    p.add_((-lr * g / q * z).to(p.dtype))

    def step(self, step: int, loss_fn: Callable[[], float], queries: int, lr: float) -> ZOStep:
        """One SPSA step with ``queries`` queries on the batch behind ``loss_fn``.

        Under torch.distributed each rank evaluates queries ``rank, rank + world, ...`` and only the
        (seed, projected gradient, loss) triples are exchanged; every rank applies the same update.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = [(i, query_seed(self.seed, step, i)) for i in range(rank, queries, world)]
        results = [(i, s, *self.projected_gradient(s, loss_fn)) for i, s in mine]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, results)
            results = sorted(r for part in gathered for r in part)
        seeds, grads, losses = [r[1] for r in results], [r[2] for r in results], [r[3] for r in results]
        loss = float(np.mean(losses))
        record = ZOStep(step, seeds, grads, lr * self.lr_scale, loss)
        if not self._healthy(loss, grads):
            self.rollback()
            record.rolled_back = True
            return record
        if self.exact:
            for g, p in zip(self.good, self.params):
                g.copy_(p)
        self.apply(seeds, grads, record.lr)
        self.running_loss = loss if self.running_loss is None else 0.9 * self.running_loss + 0.1 * loss
        return record

    def _healthy(self, loss: float, grads: list[float]) -> bool:
        if not (math.isfinite(loss) and all(map(math.isfinite, grads))):
            return False
        return self.running_loss is None or loss <= self.blowup * max(self.running_loss, 1e-8)

    @torch.no_grad()
    def rollback(self) -> None:
        """Back to the parameters before the last update (whose loss was still fine); halve the lr."""
        if not self.exact:
            raise FloatingPointError(
                f"zeroth-order training diverged (loss non-finite or above {self.blowup}x its running mean); "
                f"{self.numel:,} trainable parameters are too many to keep a rollback copy: lower the lr or eps"
            )
        for g, p in zip(self.good, self.params):
            p.copy_(g)
        self.lr_scale *= 0.5

    def replay(self, records: list[ZOStep]) -> None:
        """Re-apply logged steps to the start state: the exact parameters of the logged run."""
        for r in records:
            if r.rolled_back:
                self.rollback()
                continue
            if self.exact:
                for g, p in zip(self.good, self.params):
                    g.copy_(p)
            self.apply(r.seeds, r.grads, r.lr)
            self.running_loss = r.loss if self.running_loss is None else 0.9 * self.running_loss + 0.1 * r.loss
