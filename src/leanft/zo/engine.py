"""Zeroth-order training: SPSA with the seed trick (MeZO), several queries per step, a choice of optimiser.

One step on a batch with ``Q`` queries: for each query ``q`` draw a seed, perturb the trainable
parameters by ``+eps d_q`` and ``-eps d_q`` (the direction ``d_q`` regenerated from the seed, never stored:
``leanft.zo.noise``), take the two losses and form the projected gradient ``p_q = (l+ - l-) / (2 eps)``.
The optimiser (``leanft.zo.optimizers``: MeZO's SGD by default) turns the queries into an update, e.g.
``theta <- theta - lr * (mean_q p_q z_q + wd * (theta - anchor))``; some take one unperturbed loss too
(one-sided or curvature estimates). Only forward passes run (no autograd graph), in eval mode, so memory
stays at that of inference plus, for small trainable sets, one copy of them, plus the optimiser's state.

Choices where the sources leave room (all configurable):

* Directions come from seeds, one per (run seed, stage, step, query), never from the global RNG: ranks
  draw distinct directions, a distributed run equals a single-process run with the same seeds, each stage
  of a sequential run draws its own, and a resume needs no generator state.
* Every pass over the weights (perturb, restore, update) walks each tensor in chunks (``Noise.pieces``),
  so no full-size temporary exists: full-model MeZO peaks at inference memory plus a chunk.
* Exact restore: small float32 trainable sets (``<= copy_limit`` elements) are snapshotted and perturbed
  from the snapshot, so parameters come back bit-for-bit. Larger float32 sets (full-model MeZO) are
  perturbed in place (``+eps d, -2 eps d``), which may drift by float32 rounding, as in MeZO; the last
  ``+eps d`` that undoes a query is folded into the update's pass over the weights, so a one-query step
  draws its directions three times, not four.
* Low precision (bfloat16/float16 trainable parameters, i.e. full-model MeZO on a low-precision model):
  a perturbation of 1e-3 is below half a unit in the last place of most weights, so adding it in place
  would mostly do nothing and the estimate would be biased. Instead the weights are never modified
  while perturbed (``compute.swapped``): each module's weights read as ``theta+- = SR(theta +- eps d)``
  (stochastic rounding, ``E[theta+-] = theta +- eps d``) during that module's forward only, and ``theta``
  comes back exactly. The projected gradient is the slope along the direction actually applied, ``d + r``
  with rounding noise ``r`` of mean zero given ``d``; the update ``theta <- SR(theta - lr * ...)`` moves
  along the intended ``d``, so ``E[p d] = E[d (d + r)^T] grad = grad``: unbiased (moving along ``d + r``
  would scale each coordinate by ``1 + var(r)``). Directions that read the weights (Sparse-MeZO's mask)
  take the same path on large float32 sets.
* Float32 adapters under autocast compute in float32 while perturbed (``compute.float32_compute``).
* Divergence: a step whose loss or projected gradient is non-finite rolls back to the last good
  parameters and halves the learning rate; after ``recover`` good steps the lr doubles back, up to the
  schedule's. Activations that overflow can also leave a finite loss: beyond 1.8e19 they square to inf
  in float32 and an RMS/LayerNorm maps them to zeros, so no perturbation moves the loss. An unchanged
  loss alone is no evidence (a healthy model gives ``l+ == l-`` when the perturbation is below the
  compute precision, or when the loss is piecewise constant), so a step whose every query left it
  unchanged runs one more, unperturbed forward that looks for a module output beyond 1.8e19 or non-finite:
  only that is divergence. Otherwise the step is a normal one with zero projected gradient, and a long
  run of them warns that eps may be below the compute precision. ``blowup > 0`` also
  rolls back a loss above ``blowup`` times its running mean (off by default: one hard batch is not
  divergence). ``max_rollbacks`` rollbacks in a row stop the run with an
  error; ``max_rollbacks=0`` turns the guard off (the first divergent step stops the run), as do
  full-model sets too large to keep a rollback copy.
* State: the engine's own state (``state_dict``) is the guard's books, its rollback copy and the
  optimiser's state; with the trainable tensors it resumes a run exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .compute import float32_compute, float32_regions, owners, swapped
from .noise import BITS16, ROUND_MINUS, ROUND_PLUS, ROUND_UPDATE, UNIFORM, Noise, stochastic_round
from .optimizers import SGD


def query_schedule(epoch: int, alpha: float = 0.85, beta: float = 0.45, q_max: int = 20, q_min: int = 1) -> int:
    """AdaZeta's query number for an epoch: ``min(max(floor(alpha * epoch**beta), q_min), q_max)``."""
    return min(max(math.floor(alpha * epoch**beta), q_min), q_max)


def query_seed(run_seed: int, step: int, query: int, stage: int = 0) -> int:
    """The seed of query ``query`` at ``step`` of ``stage``: independent streams, reproducible anywhere.
    Each stage of a sequential run restarts at step 0, so the stage is part of the seed (stage 0 keeps
    the single-stage seeds)."""
    return int(np.random.SeedSequence([run_seed, step, query, *([stage] if stage else [])]).generate_state(1)[0])


OVERFLOW = math.sqrt(torch.finfo(torch.float32).max)  # ~1.8e19: its square is inf in float32
FLAT_WARNING = 20  # healthy steps in a row with an unchanged loss before the warning that eps may be too small


@dataclass
class ZOStep:
    """What one step did: its queries' seeds and projected gradients, the lr it used, its loss (the
    unperturbed loss for optimisers that take one, else the mean ``l+`` over the queries)."""

    step: int
    seeds: list[int]
    grads: list[float]  # projected gradients, in query order
    lr: float
    loss: float
    rolled_back: bool = False


class ZOEngine:
    """SPSA over the parameters of ``model`` that require grad (order fixed at construction), moved by
    ``optimizer`` (``leanft.zo.optimizers``; MeZO's SGD by default).

    ``anchors`` maps ``id(parameter)`` to the tensor its weight decay pulls towards (its start, for methods
    whose start is not zero); others decay towards zero.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        copy_limit: int = 50_000_000,
        blowup: float = 0.0,
        recover: int = 10,
        max_rollbacks: int = 5,
        decays: Callable[[torch.Tensor], bool] = lambda param: True,
        anchors: dict[int, torch.Tensor] | None = None,
        stage: int = 0,
        optimizer: SGD | None = None,
    ) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("zeroth-order training needs trainable parameters; the model has none")
        self.params = [p for _, p in self.named]
        self.decay = [weight_decay if decays(p) else 0.0 for p in self.params]
        self.anchors = [(anchors or {}).get(id(p)) for p in self.params]
        self.eps, self.seed, self.blowup, self.recover, self.max_rollbacks = eps, seed, blowup, recover, max_rollbacks
        self.stage, self.model = stage, model
        self.optimizer = optimizer if optimizer is not None else SGD()
        self.noise = Noise(self.params)
        self.numel = sum(p.numel() for p in self.params)
        self.rounded = any(p.dtype != torch.float32 for p in self.params)
        self.exact = self.numel <= copy_limit and not self.rounded
        self.swap = self.rounded or (self.optimizer.reads_weights and not self.exact)
        self.snapshot = [p.detach().clone() for p in self.params] if self.exact else None
        # the parameters before the last update, for a rollback: none with the guard off or too many to copy
        self.good = [p.detach().clone() for p in self.params] if self.numel <= copy_limit and max_rollbacks else None
        self.owners = owners(model, self.params) if self.swap else None
        self.regions = float32_regions(model, self.params)
        self.pending: tuple[int, float] | None = None  # in place: (seed, scale) of a perturbation not undone yet
        self.running_loss: float | None = None
        self.lr_scale = 1.0  # halved at every rollback, doubled back after ``recover`` good steps
        self.good_steps = 0  # good steps since the last rollback or recovery
        self.rollbacks = 0  # rollbacks in a row
        self.why = ""  # why the last step was divergence ("" when it was not)
        self.last_forwards = 0  # forward passes of the last step (its overflow check included)
        self.flat_steps = 0  # steps in a row whose every query left the loss unchanged
        self.optimizer.bind(self)

    # -- perturbation ------------------------------------------------------------------------------

    def weights(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s unperturbed value (its snapshot while an exact-mode query perturbs it)."""
        return self.snapshot[i] if self.exact else self.params[i]

    def direction(self, seed: int, i: int) -> torch.Tensor:
        """The whole direction of tensor ``i`` for query ``seed`` (float32, the tensor's shape)."""
        parts = [self.optimizer.direction(seed, i, a, b) for a, b in self.noise.pieces(i)]
        return torch.cat(parts).view(self.params[i].shape)

    def _round_into(self, out: torch.Tensor, value: torch.Tensor, i: int, a: int, b: int, seed: int,
                    stream: int) -> None:
        """``out`` (elements ``a:b`` of tensor ``i``, its dtype) := ``value`` (a float32 temporary, used up),
        stochastically rounded from the seed's ``stream``."""
        if out.dtype == torch.bfloat16:
            # bfloat16 is the top half of a float32: adding 16 random bits (uniform on [0, 2^16)) to the low half
            # of the magnitude and cutting it off rounds away from zero with probability (dropped part) / 2^16,
            # stochastic_round's law for finite values, in three integer operations
            word = value.view(torch.int32).add_(self.noise.draw(seed, stream, BITS16, i, a, b))
            out.view(torch.int16).copy_(word.bitwise_right_shift_(16))
        elif out.dtype == torch.float32:
            out.copy_(value)
        else:
            out.copy_(stochastic_round(value, out.dtype, self.noise.draw(seed, stream, UNIFORM, i, a, b)))

    def _perturbed(self, seed: int, i: int, sign: float) -> torch.Tensor:
        """``SR(theta_i + sign * eps * d_i)`` in the parameter's dtype, chunk by chunk (the swap path)."""
        p = self.params[i]
        flat, out = p.detach().reshape(-1), torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        stream = ROUND_PLUS if sign > 0 else ROUND_MINUS
        for a, b in self.noise.pieces(i):  # converted first: a mixed-dtype add is ~15x slower on CPU
            value = torch.add(flat[a:b].float(), self.optimizer.direction(seed, i, a, b), alpha=sign * self.eps)
            self._round_into(out[a:b], value, i, a, b, seed, stream)
        return out.view(p.shape)

    @torch.no_grad()
    def _move(self, seed: int, scale: float) -> None:
        """Parameters := snapshot + scale * eps * d (exact mode) or += scale * eps * d (in place)."""
        for i, p in enumerate(self.params):
            flat = p.data.view(-1)
            for a, b in self.noise.pieces(i):
                d = self.optimizer.direction(seed, i, a, b)
                if self.exact:
                    torch.add(self.snapshot[i].view(-1)[a:b], d, alpha=scale * self.eps, out=flat[a:b])
                else:
                    flat[a:b].add_(d, alpha=scale * self.eps)

    def settle(self) -> None:
        """Undo an in-place perturbation left for the update to fold in (before any other forward)."""
        if self.pending is not None:
            seed, scale = self.pending
            self.pending = None
            self._move(seed, scale)

    @torch.no_grad()
    def query(self, seed: int, loss_fn: Callable[[], float]) -> tuple[float, float | None]:
        """``(l+, l-)`` of one query (``l-`` None for a one-sided optimiser). In place, the parameters may be
        left perturbed (``pending``) for the update to restore; ``settle`` restores them."""
        one_sided = self.optimizer.one_sided
        if self.swap:
            names = [n for n, _ in self.named]
            with swapped(self.owners, names, lambda i: self._perturbed(seed, i, +1.0)):
                plus = self._perturbed_loss(loss_fn)
            if one_sided:
                return plus, None
            with swapped(self.owners, names, lambda i: self._perturbed(seed, i, -1.0)):
                return plus, self._perturbed_loss(loss_fn)
        self.settle()
        if self.exact:
            for s, p in zip(self.snapshot, self.params):
                s.copy_(p)
        self._move(seed, +1.0)
        plus = self._perturbed_loss(loss_fn)
        minus = None
        if not one_sided:
            self._move(seed, -1.0 if self.exact else -2.0)
            minus = self._perturbed_loss(loss_fn)
        if self.exact:
            for s, p in zip(self.snapshot, self.params):
                p.copy_(s)
        else:
            self.pending = (seed, -1.0 if one_sided else 1.0)
        return plus, minus

    def projected_gradient(self, seed: int, loss_fn: Callable[[], float]) -> tuple[float, float]:
        """``(p, l+)`` of one two-sided query; parameters are restored afterwards."""
        plus, minus = self.query(seed, loss_fn)
        self.settle()
        return (plus - minus) / (2 * self.eps), plus

    @torch.no_grad()  # the unperturbed loss of fzoo/hizoo too: no autograd graph, inference memory
    def _perturbed_loss(self, loss_fn: Callable[[], float]) -> float:
        """``loss_fn()`` with the modules holding float32 trainable parameters computing in float32."""
        with float32_compute(*self.regions):
            return loss_fn()

    # -- update ------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, seeds: list[int], weights: list[float], lr: float) -> None:
        """``theta <- rule(theta - lr * wd * (theta - anchor), sum_q w_q d_q)`` chunk by chunk, the directions
        regenerated from the seeds (sgd: ``theta - lr * sum_q w_q d_q``); a pending in-place perturbation is
        undone in the same pass. One rounding per element (stochastic in low precision)."""
        opt, pending = self.optimizer, self.pending
        self.pending = None
        opt.prepare(seeds, weights)
        for i, p in enumerate(self.params):
            flat = p.data.view(-1)
            anchor = None if self.anchors[i] is None else self.anchors[i].reshape(-1)
            # float32 weights are updated in place, unless the directions read them (the swap path's sparse mask)
            copy = self.swap or p.dtype != torch.float32
            for a, b in self.noise.pieces(i):
                theta = flat[a:b].to(torch.float32, copy=True) if copy else flat[a:b]
                if pending is not None:
                    theta.add_(opt.direction(pending[0], i, a, b), alpha=pending[1] * self.eps)
                if self.decay[i]:
                    pull = theta if anchor is None else theta - anchor[a:b].float()
                    theta.sub_(pull, alpha=lr * self.decay[i])
                new = opt.update(seeds, weights, i, a, b, theta, lr)
                if copy or new.data_ptr() != theta.data_ptr():
                    self._round_into(flat[a:b], new, i, a, b, seeds[0], ROUND_UPDATE)

    def step(self, step: int, loss_fn: Callable[[], float], queries: int, lr: float) -> ZOStep:
        """One step with ``queries`` queries on the batch behind ``loss_fn``.

        Under torch.distributed each rank evaluates queries ``rank, rank + world, ...`` and only the
        (seed, losses) of each query are exchanged; every rank applies the same update. The unperturbed
        loss, for optimisers that take one, is computed by every rank (the same batch: the same number).
        A rank with fewer queries than another runs as many forwards anyway, of the unperturbed model,
        their losses discarded: a ``loss_fn`` may make collective calls (TRL gathers its metrics in
        each forward), which hang or abort unless every rank makes them equally often.
        """
        opt = self.optimizer
        if queries < opt.min_queries:
            raise ValueError(f"the {opt.name} zeroth-order optimizer needs at least {opt.min_queries} queries a step, "
                             f"got {queries}: raise --zo-queries")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        opt.begin(step)
        center = self._perturbed_loss(loss_fn) if opt.center else None
        mine = [(i, query_seed(self.seed, step, i, self.stage)) for i in range(rank, queries, world)]
        results = [(i, s, *self.query(s, loss_fn)) for i, s in mine]
        if math.ceil(queries / world) > len(mine):
            self.settle()
            with torch.no_grad():  # as the queries' forwards: no autograd graph kept
                for _ in range((math.ceil(queries / world) - len(mine)) * (1 if opt.one_sided else 2)):
                    loss_fn()
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, results)
            results = sorted(r for part in gathered for r in part)
        seeds, plus, minus = [r[1] for r in results], [r[2] for r in results], [r[3] for r in results]
        grads = [opt.projected(pl, mi, center) for pl, mi in zip(plus, minus)]
        loss = center if opt.center else float(np.mean(plus))
        record = ZOStep(step, seeds, grads, lr * self.lr_scale, loss)
        self.last_forwards = opt.forwards(len(seeds))
        flat = all(g == 0 for g in grads)
        finite = math.isfinite(loss) and all(map(math.isfinite, grads))
        if flat or not finite:
            self.settle()
        self.why = self._unhealthy(loss, grads, flat, loss_fn)
        if self.why:
            self.settle()
            self.rollback(self.why)
            record.rolled_back = True
            return record
        self._count_flat(flat)
        self._update(record, opt.weights(grads, plus, minus, center))
        return record

    def _unhealthy(self, loss: float, grads: list[float], flat: bool, loss_fn: Callable[[], float]) -> str:
        """Why this step is divergence, or "" when it is not (``flat``: no query moved the loss)."""
        if not (math.isfinite(loss) and all(map(math.isfinite, grads))):
            return "non-finite loss or projected gradient"
        where = self._overflow(loss_fn) if flat else ""
        if where:
            return (f"the loss ({loss:.6g}) did not change under any perturbation and the output of {where} is "
                    f"beyond {OVERFLOW:.2g} or not finite: the activations overflowed, and a normalisation layer "
                    "turned them into zeros, so the output no longer depends on the trainable parameters")
        if self.blowup and self.running_loss is not None and loss > self.blowup * max(self.running_loss, 1e-8):
            return f"a loss above {self.blowup}x its running mean"
        return ""

    @torch.no_grad()
    def _overflow(self, loss_fn: Callable[[], float]) -> str:
        """The first module whose output overflowed, in one more forward of the unperturbed model, or "".

        Run when every query left the loss exactly unchanged. That happens to a healthy model when a
        perturbation is below the compute precision or the loss is piecewise constant, and to one whose
        activations overflowed (an RMS/LayerNorm maps values beyond ``OVERFLOW``, whose square is inf in
        float32, to zeros); only the latter shows values that large. Every process runs the forward and
        the first module any process found is the answer, so all decide alike."""
        self.last_forwards += 1
        names = {m: name or "the model" for name, m in self.model.named_modules()}
        found: list[str] = []

        def check(module, args, output):
            outputs = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) \
                else (output,)
            if not found and any(torch.is_tensor(t) and t.is_floating_point() and not bool((t.abs() <= OVERFLOW).all())
                                 for t in outputs):
                found.append(names[module])

        hooks = [m.register_forward_hook(check) for m in names]
        try:
            loss_fn()
        finally:
            for h in hooks:
                h.remove()
        if dist.is_initialized() and dist.get_world_size() > 1:
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, found)
            found = [name for part in every for name in part]
        return found[0] if found else ""

    def _count_flat(self, flat: bool) -> None:
        """Warn once when ``FLAT_WARNING`` healthy steps in a row left the loss unchanged under every query."""
        self.flat_steps = self.flat_steps + 1 if flat else 0
        if self.flat_steps == FLAT_WARNING:
            warnings.warn(f"{FLAT_WARNING} zeroth-order steps in a row left the loss exactly unchanged under every "
                          f"perturbation, so they moved only by weight decay: eps ({self.eps:g}) may be below the "
                          "compute precision; raise it (--zo-eps) or train in float32", stacklevel=3)

    def _update(self, record: ZOStep, weights: list[float]) -> None:
        """Apply a healthy step (keeping the parameters before it for a rollback) and keep the books."""
        if self.good is not None:
            for g, p in zip(self.good, self.params):
                g.copy_(p)
        self.apply(record.seeds, weights, record.lr)
        self.running_loss = record.loss if self.running_loss is None else 0.9 * self.running_loss + 0.1 * record.loss
        self.rollbacks, self.good_steps = 0, self.good_steps + 1
        if self.lr_scale < 1.0 and self.good_steps >= self.recover:
            self.lr_scale, self.good_steps = min(1.0, 2 * self.lr_scale), 0

    @torch.no_grad()
    def rollback(self, why: str = "a logged divergence") -> None:
        """Back to the parameters before the last update (whose loss was still fine); halve the lr."""
        if self.good is None:
            cause = ("the divergence guard is off (max_rollbacks 0)" if not self.max_rollbacks else
                     f"{self.numel:,} trainable parameters are too many to keep a rollback copy")
            raise FloatingPointError(
                f"zeroth-order training diverged ({why}) and {cause}: the run stops here (its checkpoint is from "
                "before this step); lower the lr and resume")
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise FloatingPointError(
                f"zeroth-order training rolled back {self.max_rollbacks} steps in a row ({why}) and diverged again: "
                "the run stops (its checkpoint is from before these steps); lower the lr and resume")
        for g, p in zip(self.good, self.params):
            p.copy_(g)
        self.lr_scale *= 0.5
        self.good_steps = 0

    def state_dict(self) -> dict:
        """What the engine holds beyond the parameters themselves: the divergence guard's books, its
        rollback copy and the optimiser's state. With the trainable tensors it continues a run exactly:
        directions come from seeds, not from a generator's state. ``device_type`` is where the directions
        are drawn (CPU and CUDA give different numbers for one seed)."""
        self.settle()
        good = None if self.good is None else {n: g.detach().to("cpu", copy=True) for (n, _), g in zip(self.named, self.good)}
        return {"names": [n for n, _ in self.named], "device_type": device_types(self.params),
                "lr_scale": self.lr_scale, "good_steps": self.good_steps, "rollbacks": self.rollbacks,
                "running_loss": self.running_loss, "flat_steps": self.flat_steps, "good": good,
                "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s books, after checking it was written for these trainable tensors."""
        names = [n for n, _ in self.named]
        if state.get("names") != names:
            raise ValueError(f"the zeroth-order state was written for {len(state.get('names') or [])} other trainable "
                             f"tensors than this model's {len(names)}: was it written for another method or model?")
        self.optimizer.load_state_dict(state.get("optimizer", {"name": "sgd"}))
        here = device_types(self.params)
        if state["device_type"] != here:
            warnings.warn(f"the zeroth-order run drew its directions on {state['device_type']} and continues on {here}: "
                          "the two generators give different directions for one seed, so the run continues correctly "
                          "but not as the uninterrupted one would have", stacklevel=2)
        self.lr_scale, self.good_steps, self.rollbacks = state["lr_scale"], state["good_steps"], state["rollbacks"]
        self.running_loss, self.flat_steps = state["running_loss"], state["flat_steps"]
        if self.good is not None and state["good"] is not None:
            for (n, _), g in zip(self.named, self.good):
                g.copy_(state["good"][n])
        elif self.good is not None:  # saved without a rollback copy (guard off then): the parameters now are good
            for g, p in zip(self.good, self.params):
                g.copy_(p)


def device_types(params) -> str:
    """The device type(s) the tensors ``params`` live on, as ``"cpu"``, ``"cuda"`` or e.g. ``"cpu+cuda"``."""
    return "+".join(sorted({p.device.type for p in params}))
