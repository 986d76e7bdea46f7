"""Zeroth-order optimisers: what a step perturbs along, how its queries' losses become a gradient estimate,
and how that estimate moves the weights.

Every optimiser here works from seeds and scalars alone (the engine exchanges nothing else between
processes) and on any trainable set. A step with queries ``q = 1..Q`` forms the estimate
``G = sum_q w_q d_q`` of directions ``d_q`` regenerated from the queries' seeds, then ``rule`` turns ``G``
into the update, chunk by chunk (``engine.ZOEngine.apply``); weight decay ``theta -= lr wd (theta - anchor)``
comes before it, decoupled, for every optimiser.

The optimisers (``p_q = (l(+eps d_q) - l(-eps d_q)) / 2 eps`` unless said otherwise; state per weight):

* ``sgd`` (MeZO): ``d = z``, ``w_q = p_q / Q``, ``theta -= lr G``. No state.
* ``momentum`` (ZO-SGD-MMT): ``m = beta m + (1 - beta) G``, ``theta -= lr m``. One float32.
* ``adam`` (ZO-Adam): Adam's bias-corrected moments of ``G``. Two float32.
* ``sign`` (ZO-SignSGD): ``theta -= lr sign(G)``. No state.
* ``fzoo`` (FZOO, normalised SGD): one-sided, ``l0 = l(theta)`` once a step and
  ``p_q = (l(+eps u_q) - l0) / eps`` with Rademacher ``u``; ``theta -= lr G / sigma``, ``sigma`` the sample sd of
  the ``Q >= 2`` perturbed losses; ``Q + 1`` forwards. No state.
* ``hizoo`` (HiZOO): ``d = z / sqrt(h)``, ``h`` a running diagonal-Hessian estimate
  ``h = (1 - a) h + a |delta z^2 h|`` with ``delta = (l+ + l- - 2 l0) / 2 eps^2``; ``2Q + 1`` forwards. One float32.
* ``lozo`` (LOZO): a matrix's ``d = U V^T``, ``U`` per query and ``V`` per ``interval`` steps (the lazy subspace),
  ``G / rank``; vectors as sgd. With ``momentum`` (LOZO-M) the moment is kept on the ``U`` side (``rank`` floats per
  matrix row) and carried into each new subspace.
* ``sparse`` (Sparse-MeZO): ``d = z * [|theta| <= h]``, ``h`` each tensor's ``1 - sparsity`` quantile of ``|theta|``
  at the step's start. No state.

State that scales with the model (momentum, Adam, HiZOO's Hessian) is float32 whatever the weights'
dtype: on a full model it costs 1-2x the float32 weights, which defeats zeroth-order training's point
(inference memory) there; on an adapter set it is negligible.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import torch

from .noise import DIRECTIONS, GAUSSIAN, LOW_RANK_U, LOW_RANK_V, RADEMACHER, Z, generator, mix

if TYPE_CHECKING:
    from .engine import ZOEngine


class SGD:
    """MeZO's SPSA step: two-sided queries along ``z``; the base every optimiser here refines."""

    name = "sgd"
    one_sided = False  # queries take only l(theta + eps d), around one unperturbed loss per step
    center = False  # the step also takes the unperturbed loss l0 (one more forward)
    reads_weights = False  # the direction depends on theta: perturb without modifying the weights
    min_queries = 1
    state_tensors = 0  # float32 tensors of the weights' size kept between steps

    def __init__(self, directions: str = GAUSSIAN) -> None:
        if directions not in DIRECTIONS:
            raise ValueError(f"unknown zeroth-order directions {directions!r}; choose one of {', '.join(DIRECTIONS)}")
        self.kind = directions
        self.engine: ZOEngine | None = None

    def bind(self, engine: ZOEngine) -> None:
        """Attach to the engine whose trainable tensors this optimiser moves (state is made here)."""
        self.engine = engine

    def forwards(self, queries: int) -> int:
        """Forward passes of a step with ``queries`` queries."""
        return queries * (1 if self.one_sided else 2) + (1 if self.center else 0)

    def fitting(self, queries: int, spent: int, budget: int) -> int:
        """``queries`` cut so the step fits in what is left of a budget of ``budget`` forwards (0 when none fits)."""
        while queries > 0 and spent + self.forwards(queries) > budget:
            queries -= 1
        return queries

    def begin(self, step: int) -> None:
        """Before a step's queries."""

    def direction(self, seed: int, i: int, a: int, b: int) -> torch.Tensor:
        """Elements ``a:b`` of tensor ``i``'s direction for query ``seed`` (float32)."""
        return self.engine.noise.draw(seed, Z, self.kind, i, a, b)

    def projected(self, plus: float, minus: float | None, center: float | None) -> float:
        """A query's projected gradient: the slope of the loss along its direction."""
        return (plus - minus) / (2 * self.engine.eps)

    def weights(self, grads: list[float], plus: list[float], minus: list, center: float | None) -> list[float]:
        """``w_q`` of each query's direction in ``G`` (the queries' projected gradients and losses)."""
        return [g / len(grads) for g in grads]

    def prepare(self, seeds: list[int], weights: list[float]) -> None:
        """Once before an update's chunks (a step counter, factors shared by a tensor's chunks)."""

    def estimate(self, seeds: list[int], weights: list[float], i: int, a: int, b: int) -> torch.Tensor:
        g = None
        for seed, w in zip(seeds, weights):
            d = self.direction(seed, i, a, b)
            g = d * w if g is None else g.add_(d, alpha=w)
        return g

    def update(self, seeds: list[int], weights: list[float], i: int, a: int, b: int, theta: torch.Tensor,
               lr: float) -> torch.Tensor:
        """Elements ``a:b`` of tensor ``i`` after the step, from their value ``theta`` (float32, decayed)."""
        return self.rule(i, a, b, theta, self.estimate(seeds, weights, i, a, b), lr)

    def rule(self, i: int, a: int, b: int, theta: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        return theta.sub_(g, alpha=lr)

    # -- state --------------------------------------------------------------------------------------

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in self.engine.params]

    def _named(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu", copy=True) for (n, _), t in zip(self.engine.named, tensors)}

    def _load(self, tensors: list[torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
        for (n, _), t in zip(self.engine.named, tensors):
            t.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name", "sgd") != self.name:
            raise ValueError(f"the zeroth-order state was written by optimiser {state.get('name')!r}, not "
                             f"{self.name!r}: resume with --zo-optimizer {state.get('name')}")


class Momentum(SGD):
    name = "momentum"
    state_tensors = 1

    def __init__(self, directions: str = GAUSSIAN, momentum: float = 0.9) -> None:
        super().__init__(directions)
        if not 0 <= momentum < 1:
            raise ValueError(f"zo momentum must be in [0, 1), got {momentum}")
        self.beta = momentum

    def bind(self, engine: ZOEngine) -> None:
        super().bind(engine)
        self.m = self._zeros()

    def rule(self, i, a, b, theta, g, lr):
        m = self.m[i][a:b]
        m.mul_(self.beta).add_(g, alpha=1 - self.beta)
        return theta.sub_(m, alpha=lr)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "m": self._named(self.m)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load(self.m, state["m"])


class Adam(SGD):
    name = "adam"
    state_tensors = 2

    def __init__(self, directions: str = GAUSSIAN, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8) -> None:
        super().__init__(directions)
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"zo Adam betas must be in [0, 1), got {betas}")
        self.betas, self.adam_eps, self.t = tuple(betas), adam_eps, 0

    def bind(self, engine: ZOEngine) -> None:
        super().bind(engine)
        self.m, self.v = self._zeros(), self._zeros()

    def prepare(self, seeds, weights):
        self.t += 1

    def rule(self, i, a, b, theta, g, lr):
        (b1, b2), m, v = self.betas, self.m[i][a:b], self.v[i][a:b]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = lr / (1 - b1 ** self.t)
        denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.adam_eps)
        return theta.addcdiv_(m, denom, value=-step)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "t": self.t, "m": self._named(self.m), "v": self._named(self.v)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.t = state["t"]
        self._load(self.m, state["m"])
        self._load(self.v, state["v"])


class Sign(SGD):
    name = "sign"

    def rule(self, i, a, b, theta, g, lr):
        return theta.sub_(g.sign_(), alpha=lr)


class FZOO(SGD):
    name = "fzoo"
    one_sided = True
    center = True
    min_queries = 2

    def __init__(self, directions: str = RADEMACHER) -> None:
        super().__init__(directions)

    def projected(self, plus, minus, center):
        return (plus - center) / self.engine.eps

    def weights(self, grads, plus, minus, center):
        sigma = statistics.stdev(plus) if len(plus) > 1 else 0.0
        if not sigma > 0:  # every query gave the same loss: no slope seen (the guard's flat step)
            return [0.0] * len(grads)
        return [g / (len(grads) * sigma) for g in grads]


class HiZOO(SGD):
    name = "hizoo"
    center = True
    state_tensors = 1

    def __init__(self, directions: str = GAUSSIAN, hessian_smoothing: float = 1e-3) -> None:
        super().__init__(directions)
        if not 0 < hessian_smoothing <= 1:
            raise ValueError(f"zo hessian smoothing must be in (0, 1], got {hessian_smoothing}")
        self.alpha = hessian_smoothing
        self.found: list[float] | None = None  # the last step's curvatures, until its update takes them
        self.deltas: list[float] | None = None  # the curvatures of the update under way

    def bind(self, engine: ZOEngine) -> None:
        super().bind(engine)
        self.h = [torch.ones(p.numel(), dtype=torch.float32, device=p.device) for p in engine.params]

    def direction(self, seed, i, a, b):
        return super().direction(seed, i, a, b).mul(self.h[i][a:b].rsqrt())

    def weights(self, grads, plus, minus, center):
        eps = self.engine.eps
        self.found = [(p + m - 2 * center) / (2 * eps * eps) for p, m in zip(plus, minus)]
        return super().weights(grads, plus, minus, center)

    def prepare(self, seeds, weights):
        """Take the step's curvatures; an update replayed without a step (``apply`` alone) has none, and
        leaves ``h`` as it is."""
        self.deltas, self.found = self.found, None

    def update(self, seeds, weights, i, a, b, theta, lr):
        h = self.h[i][a:b]
        scale = h.rsqrt()
        curvature = torch.zeros_like(h)
        new = theta
        for q, (seed, w) in enumerate(zip(seeds, weights)):
            z = SGD.direction(self, seed, i, a, b)
            new = new.sub_(z * scale, alpha=lr * w)
            if self.deltas is not None:
                curvature.addcmul_(z, z, value=self.deltas[q] / len(seeds))
        if self.deltas is not None:
            curvature.mul_(h).abs_()  # |delta z^2 h| with this step's h, before h is scaled below
            h.mul_(1 - self.alpha).add_(curvature, alpha=self.alpha)
        return new

    def state_dict(self) -> dict:
        return {**super().state_dict(), "h": self._named(self.h)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load(self.h, state["h"])


class LOZO(SGD):
    name = "lozo"

    def __init__(self, directions: str = GAUSSIAN, rank: int = 2, interval: int = 50, momentum: float = 0.0) -> None:
        super().__init__(directions)
        if rank < 1 or interval < 1 or not 0 <= momentum < 1:
            raise ValueError(f"zo lozo needs rank >= 1, interval >= 1 and momentum in [0, 1); got {rank}, "
                             f"{interval}, {momentum}")
        self.rank, self.interval, self.beta = rank, interval, momentum
        self.subspace = 0
        self.cache: dict = {}

    def bind(self, engine: ZOEngine) -> None:
        super().bind(engine)
        self.shapes = [self._matrix(p) for p in engine.params]
        self.n = [None if s is None else torch.zeros(s[0], self.rank, device=p.device)
                  for s, p in zip(self.shapes, engine.params)] if self.beta else []

    def _matrix(self, p: torch.Tensor) -> tuple[int, int] | None:
        """``(rows, columns)`` a tensor is perturbed as, or None for one perturbed as a vector."""
        if p.ndim < 2:
            return None
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        return (rows, cols) if min(rows, cols) > self.rank else None

    def _factor(self, key: tuple, rows: int, device) -> torch.Tensor:
        if key not in self.cache:
            if len(self.cache) > 64:
                self.cache.clear()
            seeded = generator(device).manual_seed(mix(*key))
            self.cache[key] = torch.randn(rows, self.rank, generator=seeded, device=device)
        return self.cache[key]

    def _u(self, seed: int, i: int) -> torch.Tensor:
        return self._factor((seed, LOW_RANK_U, i), self.shapes[i][0], self.engine.params[i].device)

    def _v(self, i: int, subspace: int | None = None) -> torch.Tensor:
        k = self.subspace if subspace is None else subspace
        return self._factor((self.engine.seed, self.engine.stage, k, LOW_RANK_V, i), self.shapes[i][1],
                            self.engine.params[i].device)

    def begin(self, step: int) -> None:
        k = step // self.interval
        if k != self.subspace and self.beta:  # carry the moment into the new subspace: N V_old^T V_new / n
            for i, n in enumerate(self.n):
                if n is not None:
                    n.copy_(n @ (self._v(i, self.subspace).T @ self._v(i, k)) / self.shapes[i][1])
        self.subspace = k

    def _rows(self, u: torch.Tensor, i: int, a: int, b: int) -> torch.Tensor:
        """Elements ``a:b`` of ``u V^T`` flattened (only the rows they lie in are formed)."""
        cols = self.shapes[i][1]
        first, last = a // cols, (b - 1) // cols + 1
        return (u[first:last] @ self._v(i).T).reshape(-1)[a - first * cols:b - first * cols]

    def direction(self, seed, i, a, b):
        if self.shapes[i] is None:
            return super().direction(seed, i, a, b)
        return self._rows(self._u(seed, i), i, a, b)

    def prepare(self, seeds, weights):
        self.step_u = {}
        for i, shape in enumerate(self.shapes):
            if shape is None:
                continue
            u = sum(w * self._u(s, i) for s, w in zip(seeds, weights)) / self.rank
            if self.beta:
                self.n[i].mul_(self.beta).add_(u, alpha=1 - self.beta)
                u = self.n[i]
            self.step_u[i] = u

    def update(self, seeds, weights, i, a, b, theta, lr):
        if self.shapes[i] is None:
            return super().update(seeds, weights, i, a, b, theta, lr)
        return theta.sub_(self._rows(self.step_u[i], i, a, b), alpha=lr)

    def state_dict(self) -> dict:
        named = {n: t.detach().to("cpu", copy=True) for (n, _), t in zip(self.engine.named, self.n) if t is not None}
        return {**super().state_dict(), "subspace": self.subspace, "n": named}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.subspace = state["subspace"]
        saved = state["n"]
        moments = [(t, saved.get(name)) for (name, _), t in zip(self.engine.named, self.n) if t is not None]
        if (saved and not self.beta) or any(s is None or s.shape != t.shape for t, s in moments):
            was = f"rank {next(iter(saved.values())).shape[1]} with momentum" if saved else "no momentum"
            raise ValueError(f"the zeroth-order state was written by lozo with {was}, not rank {self.rank} with "
                             f"momentum {self.beta}: resume with the run's --zo-rank and --zo-momentum")
        for t, s in moments:
            t.copy_(s)


class Sparse(SGD):
    name = "sparse"
    reads_weights = True
    SAMPLE = 1 << 16  # elements of a tensor its threshold is estimated from

    def __init__(self, directions: str = GAUSSIAN, sparsity: float = 0.75) -> None:
        super().__init__(directions)
        if not 0 <= sparsity < 1:
            raise ValueError(f"zo sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = sparsity
        self.thresholds: list[float] = []

    def begin(self, step: int) -> None:
        """Each tensor's threshold: the ``1 - sparsity`` quantile of ``|theta|`` over an even sample of at most
        ``SAMPLE`` of its elements (a whole large tensor would cost a sort per step)."""
        self.thresholds = []
        for i in range(len(self.engine.params)):
            flat = self.engine.params[i].detach().reshape(-1)  # unperturbed between steps
            sample = flat[::max(1, flat.numel() // self.SAMPLE)].float().abs()
            k = max(1, math.ceil((1 - self.sparsity) * sample.numel()))
            self.thresholds.append(float(sample.kthvalue(k).values))

    def direction(self, seed, i, a, b):
        theta = self.engine.weights(i).detach().reshape(-1)[a:b]
        return super().direction(seed, i, a, b) * (theta.float().abs() <= self.thresholds[i])

    def state_dict(self) -> dict:
        return super().state_dict()  # thresholds are recomputed from the weights at every step


OPTIMIZERS = {cls.name: cls for cls in (SGD, Momentum, Adam, Sign, FZOO, HiZOO, LOZO, Sparse)}
# the options each optimiser takes (beyond ``directions``), for the command line and ZOTrainer
OPTIONS = {"sgd": (), "momentum": ("momentum",), "adam": ("betas",), "sign": (), "fzoo": (),
           "hizoo": ("hessian_smoothing",), "lozo": ("rank", "interval", "momentum"), "sparse": ("sparsity",)}


def make_optimizer(name: str, **options) -> SGD:
    """The optimiser ``name`` with ``options`` (None: its default); an unknown name or an option it does
    not take is an error that lists the valid ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown zeroth-order optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    given = {k: v for k, v in options.items() if v is not None}
    takes = ("directions", *OPTIONS[name])
    unknown = sorted(k for k in given if k not in takes)
    if unknown:
        raise ValueError(f"zeroth-order optimizer {name!r} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(takes)}")
    return OPTIMIZERS[name](**given)
