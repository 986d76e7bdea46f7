"""Zeroth-order training: SPSA with the seed trick (MeZO), several queries per step, AdaZeta's schedule.

One step on a batch with ``Q`` queries: for each query ``q`` draw a seed, perturb the trainable
parameters by ``+eps z_q`` and ``-eps z_q`` (``z_q ~ N(0, I)`` regenerated from the seed, never stored),
take the two losses, and form the projected gradient ``p_q = (l+ - l-) / (2 eps)``. The update is
``theta <- theta - lr * (mean_q p_q z_q + wd * theta)``, decay only where ``decays(param)`` says so.
Only forward passes run (no autograd graph, no optimiser state), in eval mode, so memory stays at that
of inference plus, for small trainable sets, one copy of them.

Choices where the sources leave room (all configurable):

* ``z`` comes from a dedicated ``torch.Generator`` seeded per query (never the global RNG); seeds are
  a deterministic function of (run seed, stage, step, query index), so ranks draw distinct directions,
  a distributed run equals a single-process run with the same seeds, and each stage of a sequential run
  draws its own.
* Exact restore: small float32 trainable sets (``<= copy_limit`` elements) are snapshotted and perturbed
  from the snapshot, so parameters come back bit-for-bit; larger float32 sets (full-model MeZO) are
  perturbed in place (``+eps z, -2 eps z, +eps z``), which may drift by float32 rounding, as in MeZO.
* Low precision (bfloat16/float16 trainable parameters, i.e. full-model MeZO on a low-precision model):
  a perturbation of 1e-3 is below half a unit in the last place of most weights, so adding it in place
  would mostly do nothing and the estimate would be biased. Instead the weights are never modified
  while perturbed: a hook swaps each module's weights for ``theta+- = SR(theta +- eps z)`` (stochastic
  rounding, ``E[theta+-] = theta +- eps z``) during that module's forward only, so one module's copy
  exists at a time and ``theta`` comes back exactly. The projected gradient ``(l+ - l-) / (2 eps)`` is
  the slope along the direction actually applied, ``z + r`` with rounding noise ``r`` of mean zero
  given ``z``; the update ``theta <- SR(theta - lr * mean_q p_q z_q)`` moves along the intended ``z``,
  so ``E[p z] = E[z (z + r)^T] grad = grad``: unbiased (moving along ``z + r`` would scale each
  coordinate by ``1 + var(r)``). Random numbers are drawn per parameter in chunks of ``CHUNK``
  elements from seeds, so no full-size float32 temporary exists and an update depends on its seeds alone.
* Float32 adapters under autocast: a perturbed forward computes the modules around float32 trainable
  tensors (adapter layers, TT heads, trained norms) in float32, their frozen base layers as before
  (``_float32_compute``). Autocast would cast those tensors to bfloat16 where they are used, and a
  perturbation of 1e-3 on an element of 0.2 is below half its unit in the last place: the forward
  would apply a rounded perturbation, with many elements not moved at all.
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
* State: the engine's own state (``state_dict``) is the guard's books and its rollback copy; with the
  trainable tensors it resumes a run exactly, since every direction is regenerated from a seed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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

# streams drawn per parameter in low precision, from (query seed, parameter index, stream, chunk)
Z, ROUND_PLUS, ROUND_MINUS, ROUND_UPDATE = range(4)
CHUNK = 1 << 18


@dataclass
class ZOStep:
    """What one step did: its queries' seeds and projected gradients, the lr it used, its loss."""

    step: int
    seeds: list[int]
    grads: list[float]  # projected gradients, in query order
    lr: float
    loss: float  # mean l+ over the queries
    rolled_back: bool = False


class ZOEngine:
    """SPSA over the parameters of ``model`` that require grad (order fixed at construction).

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
    ) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("zeroth-order training needs trainable parameters; the model has none")
        self.params = [p for _, p in self.named]
        self.decay = [weight_decay if decays(p) else 0.0 for p in self.params]
        self.anchors = [(anchors or {}).get(id(p)) for p in self.params]
        self.eps, self.seed, self.blowup, self.recover, self.max_rollbacks = eps, seed, blowup, recover, max_rollbacks
        self.stage, self.model = stage, model
        self.numel = sum(p.numel() for p in self.params)
        self.rounded = any(p.dtype != torch.float32 for p in self.params)
        self.exact = self.numel <= copy_limit and not self.rounded
        self.snapshot = [p.detach().clone() for p in self.params] if self.exact else None
        # the parameters before the last update, for a rollback: none with the guard off or too many to copy
        self.good = [p.detach().clone() for p in self.params] if self.numel <= copy_limit and max_rollbacks else None
        self.owners = _owners(model, self.params) if self.rounded else None
        self.regions = _float32_regions(model, self.params)
        self.running_loss: float | None = None
        self.lr_scale = 1.0  # halved at every rollback, doubled back after ``recover`` good steps
        self.good_steps = 0  # good steps since the last rollback or recovery
        self.rollbacks = 0  # rollbacks in a row
        self.why = ""  # why the last step was divergence ("" when it was not)
        self.extra_forwards = 0  # forwards of the last step beyond 2 per query: 1 when it checked for overflow
        self.flat_steps = 0  # steps in a row whose every query left the loss unchanged

    # -- perturbation ------------------------------------------------------------------------------

    def _directions(self, seed: int):
        """``z`` for each parameter, regenerated from ``seed`` in a fixed order (fp32)."""
        gens: dict[torch.device, torch.Generator] = {}
        for p in self.params:
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            yield torch.randn(p.shape, generator=gens[p.device], device=p.device, dtype=torch.float32)

    def _chunks(self, i: int):
        """Slices of parameter ``i`` flattened, ``CHUNK`` elements each, with their index."""
        n = self.params[i].numel()
        return enumerate(slice(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK))

    def _draw(self, seed: int, i: int, stream: int, k: int, size: int, normal: bool) -> torch.Tensor:
        """Chunk ``k`` of parameter ``i``'s own ``N(0, 1)`` or ``U[0, 1)`` stream of query ``seed``."""
        device = self.params[i].device
        gen = torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence([seed, i, stream, k]).generate_state(1)[0]))
        return (torch.randn if normal else torch.rand)(size, generator=gen, device=device, dtype=torch.float32)

    def direction(self, seed: int, i: int) -> torch.Tensor:
        """The intended ``z`` of parameter ``i`` for query ``seed`` in low precision (its chunks joined)."""
        n = self.params[i].numel()
        parts = [self._draw(seed, i, Z, k, c.stop - c.start, normal=True) for k, c in self._chunks(i)]
        return torch.cat(parts).view(self.params[i].shape) if n else torch.zeros(0)

    def _rounded(self, seed: int, i: int, sign: float) -> torch.Tensor:
        """``SR(theta_i + sign * eps * z_i)`` in the parameter's dtype (low precision), chunk by chunk."""
        p = self.params[i]
        flat, out = p.detach().reshape(-1), torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        stream = ROUND_PLUS if sign > 0 else ROUND_MINUS
        for k, c in self._chunks(i):
            n = c.stop - c.start
            z = self._draw(seed, i, Z, k, n, normal=True)
            out[c] = stochastic_round(flat[c].float() + sign * self.eps * z, p.dtype,
                                      self._draw(seed, i, stream, k, n, normal=False))
        return out.view(p.shape)

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
        if self.rounded:
            with _swapped(self, seed, +1.0):
                plus = self._perturbed_loss(loss_fn)
            with _swapped(self, seed, -1.0):
                minus = self._perturbed_loss(loss_fn)
            return (plus - minus) / (2 * self.eps), plus
        if self.exact:
            for s, p in zip(self.snapshot, self.params):
                s.copy_(p)
        self._set(seed, +1.0)
        plus = self._perturbed_loss(loss_fn)
        self._set(seed, -1.0 if self.exact else -2.0)
        minus = self._perturbed_loss(loss_fn)
        if self.exact:
            for s, p in zip(self.snapshot, self.params):
                p.copy_(s)
        else:
            self._set(seed, +1.0)
        return (plus - minus) / (2 * self.eps), plus

    def _perturbed_loss(self, loss_fn: Callable[[], float]) -> float:
        """``loss_fn()`` with the modules holding float32 trainable parameters computing in float32."""
        with _float32_compute(*self.regions):
            return loss_fn()

    # -- update ------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """``theta <- theta - lr * (mean_q p_q z_q + wd * (theta - anchor))``, z regenerated from the seeds."""
        q = len(seeds)
        if self.rounded:  # per chunk of each parameter: fp32 sum, one stochastic rounding
            for i, p in enumerate(self.params):
                flat = p.data.view(-1)
                anchor = None if self.anchors[i] is None else self.anchors[i].reshape(-1)
                for k, c in self._chunks(i):
                    n = c.stop - c.start
                    new = flat[c].float()
                    if self.decay[i]:
                        new = new - lr * self.decay[i] * (new if anchor is None else new - anchor[c].float())
                    for seed, g in zip(seeds, grads):
                        new = new - (lr * g / q) * self._draw(seed, i, Z, k, n, normal=True)
                    flat[c] = stochastic_round(new, p.dtype, self._draw(seeds[0], i, ROUND_UPDATE, k, n, normal=False))
            return
        for p, wd, anchor in zip(self.params, self.decay, self.anchors):
            if wd and anchor is None:
                p.mul_(1 - lr * wd)
            elif wd:
                p.sub_(lr * wd * (p - anchor))
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
        A rank with fewer queries than another runs as many forwards anyway, of the unperturbed model,
        their losses discarded: a ``loss_fn`` may make collective calls (TRL gathers its metrics in
        each forward), which hang or abort unless every rank makes them equally often.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = [(i, query_seed(self.seed, step, i, self.stage)) for i in range(rank, queries, world)]
        results = [(i, s, *self.projected_gradient(s, loss_fn)) for i, s in mine]
        with torch.no_grad():  # as the queries' forwards: no autograd graph kept
            for _ in range(2 * (math.ceil(queries / world) - len(mine))):
                loss_fn()
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, results)
            results = sorted(r for part in gathered for r in part)
        seeds, grads, losses = [r[1] for r in results], [r[2] for r in results], [r[3] for r in results]
        loss = float(np.mean(losses))
        record = ZOStep(step, seeds, grads, lr * self.lr_scale, loss)
        self.extra_forwards = 0
        flat = all(g == 0 for g in grads)
        self.why = self._unhealthy(loss, grads, flat, loss_fn)
        if self.why:
            self.rollback(self.why)
            record.rolled_back = True
            return record
        self._count_flat(flat)
        self._update(record)
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
        self.extra_forwards = 1
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

    def _update(self, record: ZOStep) -> None:
        """Apply a healthy step (keeping the parameters before it for a rollback) and keep the books."""
        if self.good is not None:
            for g, p in zip(self.good, self.params):
                g.copy_(p)
        self.apply(record.seeds, record.grads, record.lr)
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
        """What the engine holds beyond the parameters themselves: the divergence guard's books and its
        rollback copy. With the trainable tensors it continues a run exactly: directions come from seeds,
        not from a generator's state. ``device_type`` is where the directions are drawn (CPU and CUDA give
        different numbers for one seed)."""
        good = None if self.good is None else {n: g.detach().to("cpu", copy=True) for (n, _), g in zip(self.named, self.good)}
        return {"names": [n for n, _ in self.named], "device_type": device_types(self.params),
                "lr_scale": self.lr_scale, "good_steps": self.good_steps, "rollbacks": self.rollbacks,
                "running_loss": self.running_loss, "flat_steps": self.flat_steps, "good": good}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s books, after checking it was written for these trainable tensors."""
        names = [n for n, _ in self.named]
        if state.get("names") != names:
            raise ValueError(f"the zeroth-order state was written for {len(state.get('names') or [])} other trainable "
                             f"tensors than this model's {len(names)}: was it written for another method or model?")
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


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, uniform: torch.Tensor) -> torch.Tensor:
    """``value`` (float32) rounded to ``dtype`` up or down at random, with ``E[result] = value``.

    Each element goes to the nearest representable number, or to the neighbour on ``value``'s other side
    with probability ``|value - nearest| / |neighbour - nearest|``, decided by ``uniform`` (U[0, 1) of
    ``value``'s shape). Rounding to nearest would drop every change below half a unit in the last place:
    in bfloat16, adding 1e-3 to 1.0 does nothing.
    """
    if dtype == torch.float32:
        return value.clone()
    nearest = value.to(dtype)
    toward = torch.where(value > nearest.float(), float("inf"), float("-inf")).to(dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.float() - nearest.float()
    p = torch.where(gap != 0, (value - nearest.float()) / gap, torch.zeros_like(value))
    return torch.where(uniform < p, neighbour, nearest)


def _owners(model: torch.nn.Module, params: list[torch.Tensor]) -> list[tuple[torch.nn.Module, str, int]]:
    """Every (module, attribute, parameter index) that holds a trainable parameter directly; a tied
    weight appears once per module that holds it."""
    index = {p: i for i, p in enumerate(params)}
    return [(m, name, index[p]) for m in model.modules() for name, p in m._parameters.items()
            if p is not None and p in index]


def _float32_regions(model: torch.nn.Module, params: list[torch.Tensor]):
    """Where a perturbed forward computes in float32: ``(regions, frozen)``. A region (module -> device
    type) is, for each module holding a float32 trainable parameter, the lowest module around it that
    also holds frozen parameters (an adapter layer with its base layer, a wrapper with the original), or
    the whole model; so code that reads the parameter outside its own module's forward (a factor made
    dense, a frozen start copy subtracted) is inside too. ``frozen`` are the regions' children without
    trainable parameters (base layers): they compute as before. A region that itself holds a frozen
    low-precision tensor is left out: float32 code cannot read it."""
    parent = {child: m for m in model.modules() for child in m.children()}
    regions = {}
    for module, _, i in _owners(model, params):
        if params[i].dtype != torch.float32:
            continue
        while module in parent and all(p.requires_grad for p in module.parameters()):
            module = parent[module]
        if all(p.dtype == torch.float32 for p in module.parameters(recurse=False)):
            regions[module] = params[i].device.type
    frozen = {c for m in regions for c in m.children()
              if any(not p.requires_grad for p in c.parameters()) and not any(p.requires_grad for p in c.parameters())}
    return regions, frozen


def _float32(x):
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


@contextlib.contextmanager
def _float32_compute(regions: dict[torch.nn.Module, str], frozen: set[torch.nn.Module]):
    """While a perturbed loss is computed under autocast, each region (``_float32_regions``) runs without
    autocast, its floating inputs made float32, and its frozen children run under the autocast it left.
    Under autocast a float32 trainable tensor is cast to the low dtype where it is used, rounding
    ``eps z`` away for most elements (a bfloat16 element of 0.2 moves in steps of 1e-3), so the loss would
    not see the perturbation the update assumes. Outside autocast the hooks change nothing."""
    entered: list = []  # per running hooked module: the autocast context it entered, or None
    left: list[tuple[str, torch.dtype]] = []  # the autocast each running region turned off

    def into_region(module, args, kwargs):
        device = regions[module]
        if not torch.is_autocast_enabled(device):
            entered.append(None)
            return None
        left.append((device, torch.get_autocast_dtype(device)))
        entered.append(torch.autocast(device, enabled=False))
        entered[-1].__enter__()
        return tuple(map(_float32, args)), {k: _float32(v) for k, v in kwargs.items()}

    def into_frozen(module, args):
        if not left or torch.is_autocast_enabled(left[-1][0]):
            entered.append(None)
            return
        entered.append(torch.autocast(left[-1][0], dtype=left[-1][1]))
        entered[-1].__enter__()

    def out_of(module, args, output):
        context = entered.pop()
        if context is not None:
            context.__exit__(None, None, None)
            if module in regions:
                left.pop()

    hooks = [m.register_forward_pre_hook(into_region, with_kwargs=True) for m in regions]
    hooks += [m.register_forward_pre_hook(into_frozen) for m in frozen]
    hooks += [m.register_forward_hook(out_of) for m in (*regions, *frozen)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for context in reversed(entered):  # a forward that raised midway
            if context is not None:
                context.__exit__(None, None, None)


@contextlib.contextmanager
def _swapped(engine: ZOEngine, seed: int, sign: float):
    """While the loss is computed, each module's trainable weights read as ``SR(theta +- eps z)`` during
    its own forward; the original tensors are put back after it (and on any error)."""
    held: dict[tuple[torch.nn.Module, str], torch.Tensor] = {}
    seen: set[int] = set()
    by_module: dict[torch.nn.Module, list[tuple[str, int]]] = {}
    for module, name, i in engine.owners:
        by_module.setdefault(module, []).append((name, i))

    def before(module, args):
        for name, i in by_module[module]:
            param = module._parameters[name]
            held[module, name] = param.data
            param.data = engine._rounded(seed, i, sign)
            seen.add(i)

    def after(module, args, output):
        for name, _ in by_module[module]:
            module._parameters[name].data = held.pop((module, name))

    hooks = [h for m in by_module for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for (module, name), data in held.items():  # a forward that raised midway
            module._parameters[name].data = data
    missing = [engine.named[i][0] for i in range(len(engine.params)) if i not in seen]
    if missing:
        raise ValueError(f"zeroth-order training in low precision perturbs each weight inside its module's forward, "
                         f"and {len(missing)} trainable parameter(s) were used outside one (e.g. {missing[:3]}); "
                         "train in float32 (--dtype float32) or with an adapter method")
