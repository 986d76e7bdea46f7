"""Each zeroth-order optimiser (``leanft.zo.optimizers``) held to the step its docstring documents, on a toy whose
losses are exact; each one training a tiny model in float32 and in bfloat16; each resumed bit for bit; and the
refusals of settings that cannot work."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import reloaded, tiny_llama
from peft import LoraConfig, get_peft_model

from leanft import optim
from leanft.config import TrainConfig
from leanft.zo import OPTIMIZERS, ZOEngine, make_optimizer
from leanft.zo.noise import GAUSSIAN, RADEMACHER, Z

NAMES = list(OPTIMIZERS)


class Quadratic(torch.nn.Module):
    """A 6x5 matrix and a vector of 8, trainable, and the loss ``0.5 |A vec(W) + B v - c|^2`` of them in float64
    (its forward, so the swap path, which perturbs weights inside their module's forward, applies too): a
    quadratic, so each central difference is exactly the slope along its direction and every step can be
    worked out by hand."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.A, self.B, self.c = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                                  for shape in ((40, 30), (40, 8), (40,)))
        self.W = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        self.v = torch.nn.Parameter(torch.randn(8, generator=gen))

    def residual(self, W, v) -> torch.Tensor:
        return self.A @ W.detach().double().reshape(-1) + self.B @ v.detach().double() - self.c

    def forward(self) -> torch.Tensor:
        return 0.5 * self.residual(self.W, self.v).pow(2).sum()


def toy():
    """The quadratic, a loss function that counts its calls (``calls[0]``: forwards), the loss at given weights
    (rounded to float32 as the engine's perturbed weights are) and the exact gradient."""
    module, calls = Quadratic(), [0]

    def loss_fn() -> float:
        calls[0] += 1
        return float(module())

    def loss_at(W, v) -> float:
        return float(0.5 * module.residual(W.float(), v.float()).pow(2).sum())

    def gradient(W, v) -> list[torch.Tensor]:
        r = module.residual(W, v)
        return [(module.A.T @ r).view(6, 5), module.B.T @ r]

    return module, loss_fn, loss_at, gradient, calls


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


# every optimiser, with settings under which its state matters within three steps
CASES = {"sgd": ("sgd", {}), "momentum": ("momentum", {"momentum": 0.8}), "adam": ("adam", {"betas": (0.8, 0.9)}),
         "sign": ("sign", {}), "fzoo": ("fzoo", {}), "hizoo": ("hizoo", {"hessian_smoothing": 0.5}),
         "lozo": ("lozo", {"rank": 2, "interval": 1}), "lozo-m": ("lozo", {"rank": 2, "interval": 1, "momentum": 0.5}),
         "sparse": ("sparse", {"sparsity": 0.5})}
STEP_LR = {"adam": 1e-2, "sign": 1e-2}  # others 1e-3
EPS = 0.1  # large: the float32 rounding of a perturbed point is far below eps^2 (HiZOO's curvature)


class Documented:
    """One optimiser's step as its docstring's table writes it, in float64, with its state kept here."""

    def __init__(self, name: str, options: dict, engine: ZOEngine, loss_at) -> None:
        self.name, self.options, self.engine, self.loss_at = name, options, engine, loss_at
        self.t, self.m, self.v = 0, None, None
        self.h = [torch.ones(p.shape, dtype=torch.float64) for p in engine.params]  # HiZOO's starts at 1
        self.n, self.old_v = None, None  # LOZO-M's moment (rows x rank) and the V it lives with

    def z(self, seed: int, i: int, kind: str = GAUSSIAN) -> torch.Tensor:
        return self.engine.noise.full(seed, Z, kind, i).view(self.engine.params[i].shape).double()

    def directions(self, seed: int, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.name == "fzoo":
            return [self.z(seed, i, RADEMACHER) for i in range(len(theta))]
        if self.name == "hizoo":
            return [self.z(seed, i) / self.h[i].sqrt() for i in range(len(theta))]
        if self.name == "lozo":  # the matrix's U V^T, as the engine draws it (its rank is tested on its own)
            return [self.engine.direction(seed, 0).double(), self.z(seed, 1)]
        if self.name == "sparse":
            return [self.z(seed, i) * self.mask(t) for i, t in enumerate(theta)]
        return [self.z(seed, i) for i in range(len(theta))]

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """The ``1 - sparsity`` fraction of the tensor's entries smallest in magnitude."""
        k = math.ceil((1 - self.options["sparsity"]) * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().reshape(-1).argsort()[:k]] = True
        return keep.view(t.shape)

    def step(self, theta: list[torch.Tensor], seeds: list[int], lr: float):
        """The weights after the step from ``theta``, the queries' projected gradients, the step's loss and the
        queries' directions."""
        eps, Q = self.engine.eps, len(seeds)
        at = lambda d, s: self.loss_at(*(t.double() + s * eps * x for t, x in zip(theta, d)))
        d = [self.directions(seed, theta) for seed in seeds]
        center = self.loss_at(*theta)
        plus = [at(dq, +1) for dq in d]
        if self.name == "fzoo":  # one-sided, normalised by the sample sd of the perturbed losses
            p = [(lp - center) / eps for lp in plus]
            w = [pq / (Q * statistics.stdev(plus)) for pq in p]
        else:
            minus = [at(dq, -1) for dq in d]
            p = [(lp - lm) / (2 * eps) for lp, lm in zip(plus, minus)]
            w = [pq / Q for pq in p]
        loss = center if self.name in ("fzoo", "hizoo") else sum(plus) / Q
        G = [sum(wq * dq[i] for wq, dq in zip(w, d)) for i in range(len(theta))]
        theta = [t.double() for t in theta]
        if self.name in ("sgd", "fzoo", "sparse"):
            new = [t - lr * g for t, g in zip(theta, G)]
        elif self.name == "momentum":
            beta = self.options["momentum"]
            self.m = [beta * m + (1 - beta) * g for m, g in zip(self.m or [0 * g for g in G], G)]
            new = [t - lr * m for t, m in zip(theta, self.m)]
        elif self.name == "adam":
            (b1, b2), self.t = self.options["betas"], self.t + 1
            self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m or [0 * g for g in G], G)]
            self.v = [b2 * v + (1 - b2) * g * g for v, g in zip(self.v or [0 * g for g in G], G)]
            new = [t - lr * (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + 1e-8)
                   for t, m, v in zip(theta, self.m, self.v)]
        elif self.name == "sign":
            new = [t - lr * g.sign() for t, g in zip(theta, G)]
        elif self.name == "hizoo":  # h = (1 - a) h + a |mean_q(delta_q z_q^2) h|, after the update used the old h
            deltas = [(lp + lm - 2 * center) / (2 * eps * eps) for lp, lm in zip(plus, minus)]
            a = self.options["hessian_smoothing"]
            new = [t - lr * g for t, g in zip(theta, G)]
            for i in range(len(theta)):
                zz = [dq[i] * self.h[i].sqrt() for dq in d]  # the Gaussian z behind each direction
                curvature = sum(dl / Q * z * z for dl, z in zip(deltas, zz)) * self.h[i]
                self.h[i] = (1 - a) * self.h[i] + a * curvature.abs()
        else:  # lozo: the matrix by sum_q w_q U_q V^T / rank (LOZO-M: a moment N on the U side), the vector as sgd
            rank, beta, opt = self.options["rank"], self.options.get("momentum", 0.0), self.engine.optimizer
            V, U = opt._v(0).double(), [opt._u(seed, 0).double() for seed in seeds]
            for dq, Uq in zip(d, U):
                torch.testing.assert_close(dq[0], Uq @ V.T, rtol=1e-5, atol=1e-6)
            u = sum(wq * Uq for wq, Uq in zip(w, U)) / rank
            if beta:
                if self.n is not None:  # carried into the new subspace: N V_old^T V_new / columns
                    self.n = self.n @ (self.old_v.T @ V) / V.shape[0]
                self.n = (1 - beta) * u if self.n is None else beta * self.n + (1 - beta) * u
                u, self.old_v = self.n, V
            new = [theta[0] - lr * u @ V.T, theta[1] - lr * G[1]]
        return new, p, loss, d


@pytest.mark.parametrize("case", list(CASES))
def test_three_steps_move_the_weights_as_the_documented_formula_says(case):
    """Three steps, so that the state each leaves (moments, Adam's step count, HiZOO's ``h``, LOZO's subspace and
    moment) is used and updated again."""
    name, options = CASES[case]
    module, loss_fn, loss_at, gradient, calls = toy()
    engine = ZOEngine(module, eps=EPS, seed=4, optimizer=make_optimizer(name, **options))
    documented, lr, queries = Documented(name, options, engine, loss_at), STEP_LR.get(name, 1e-3), 3
    for step in range(3):
        theta = [p.detach().clone() for p in engine.params]
        calls[0] = 0
        record = engine.step(step, loss_fn, queries, lr)
        expected, p, loss, d = documented.step(theta, record.seeds, lr)
        forwards = {"fzoo": queries + 1, "hizoo": 2 * queries + 1}.get(name, 2 * queries)
        assert calls[0] == engine.last_forwards == forwards
        assert record.grads == pytest.approx(p, rel=1e-5, abs=1e-4) and record.loss == pytest.approx(loss, rel=1e-6)
        if name != "fzoo":  # two-sided on a quadratic: exactly the slope along the direction
            assert p == pytest.approx([dot(gradient(*theta), dq) for dq in d], rel=1e-5, abs=1e-3)
        for i, param in enumerate(engine.params):
            torch.testing.assert_close(param.detach().double(), expected[i], rtol=1e-5, atol=2e-6, msg=f"step {step}")
        if name == "sign":  # every entry moves by exactly lr (no weight decay here)
            moved = [(param.detach() - t).abs() for param, t in zip(engine.params, theta)]
            assert all(torch.allclose(m, torch.full_like(m, lr), rtol=0, atol=3e-7) for m in moved)
        if name == "sparse":  # entries above the threshold neither perturbed (the slopes) nor moved
            for param, t in zip(engine.params, theta):
                assert torch.equal(param.detach()[~documented.mask(t)], t[~documented.mask(t)])
                assert not torch.equal(param.detach()[documented.mask(t)], t[documented.mask(t)])


def test_hizoo_learns_the_curvature_and_fzoo_normalises_by_the_spread():
    """Two properties behind the formulas: with smoothing 1, HiZOO's ``h`` is the last step's ``|delta z^2 h|``
    (it once came out 0, all directions infinite: the term was taken with ``h`` already scaled by ``1 - a``),
    and FZOO's step does not depend on the loss's scale (sigma scales with it)."""
    module, loss_fn, loss_at, _, _ = toy()
    engine = ZOEngine(module, eps=EPS, seed=4, optimizer=make_optimizer("hizoo", hessian_smoothing=1.0))
    documented = Documented("hizoo", {"hessian_smoothing": 1.0}, engine, loss_at)
    for step in range(2):
        theta = [p.detach().clone() for p in engine.params]
        record = engine.step(step, loss_fn, 2, 1e-3)
        documented.step(theta, record.seeds, 1e-3)
        for h, expected in zip(engine.optimizer.h, documented.h):
            assert not torch.allclose(expected, torch.ones_like(expected))
            torch.testing.assert_close(h.double(), expected.reshape(-1), rtol=1e-4, atol=1e-6)

    moved = []
    for scale in (1.0, 1000.0):
        module, loss_fn, *_ = toy()
        engine = ZOEngine(module, eps=EPS, seed=4, optimizer=make_optimizer("fzoo"))
        start = [p.detach().clone() for p in engine.params]
        engine.step(0, lambda f=loss_fn, k=scale: k * f(), 4, 1e-3)
        moved.append(torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(engine.params, start)]))
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-4, atol=1e-7)


def test_lozo_directions_are_low_rank_and_change_subspace_every_interval():
    """A matrix's direction is ``U V^T`` of rank ``rank``; ``V`` (its row space) is shared by every query of
    ``interval`` steps and then replaced; the vector is perturbed densely, as by sgd."""
    module, loss_fn, *_ = toy()
    engine = ZOEngine(module, eps=EPS, seed=1, optimizer=make_optimizer("lozo", rank=2, interval=3))
    seen = []
    for step in range(6):
        record = engine.step(step, loss_fn, 2, 1e-3)
        seen.append([engine.direction(seed, 0) for seed in record.seeds])
        v = engine.direction(record.seeds[0], 1)
        assert torch.equal(v, engine.noise.full(record.seeds[0], Z, GAUSSIAN, 1))
    rank = lambda ds: int(torch.linalg.matrix_rank(torch.cat(ds)))  # of the rows stacked
    assert all(rank([d]) == 2 for step in seen for d in step)
    assert rank(seen[0] + seen[1] + seen[2]) == rank(seen[3] + seen[4] + seen[5]) == 2  # one V per interval
    assert rank(seen[2] + seen[3]) == 4  # a new V at step 3


@pytest.mark.parametrize("copy_limit", [50_000_000, 0], ids=["exact", "swapped"])
def test_sparse_perturbs_only_the_smallest_weights_in_either_mode(copy_limit):
    """In exact mode (a snapshot) and on the swap path (large sets: the weights are read, so never modified while
    perturbed), the slope is that along ``z`` masked to ``|theta| <= threshold``, and only those entries move."""
    module, loss_fn, loss_at, gradient, _ = toy()
    engine = ZOEngine(module, eps=EPS, seed=2, copy_limit=copy_limit, optimizer=make_optimizer("sparse", sparsity=0.75))
    assert engine.swap == (copy_limit == 0)
    documented = Documented("sparse", {"sparsity": 0.75}, engine, loss_at)
    theta = [p.detach().clone() for p in engine.params]
    record = engine.step(0, loss_fn, 2, 1e-3)
    masks = [documented.mask(t) for t in theta]
    assert [int(m.sum()) for m in masks] == [8, 2]  # ceil(0.25 * 30), ceil(0.25 * 8)
    d = [documented.directions(seed, theta) for seed in record.seeds]
    assert record.grads == pytest.approx([dot(gradient(*theta), dq) for dq in d], rel=1e-5)
    for p, t, m in zip(engine.params, theta, masks):
        assert torch.equal(p.detach()[~m], t[~m]) and bool((p.detach()[m] != t[m]).all())


# ---- a tiny model, float32 adapters and full bfloat16 weights --------------------------------------

def lora_model() -> torch.nn.Module:
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def loss_of(model, tokens):
    def fn() -> float:
        with torch.no_grad():
            return float(model(input_ids=tokens, labels=tokens).loss)
    return fn


# a learning rate at which 30 steps train: FZOO's step is lr * G / sigma with sigma ~ eps |grad|, so its lr is
# about eps times the others'; full-model steps are smaller than adapter steps
TRAIN_LR = {"sgd": (0.1, 1e-3), "momentum": (0.1, 1e-3), "adam": (1e-2, 1e-3), "sign": (1e-2, 1e-3),
            "fzoo": (1e-4, 1e-5), "hizoo": (0.1, 1e-2), "lozo": (0.1, 1e-3), "sparse": (0.1, 1e-2)}


@pytest.mark.slow  # 30 steps each, 16 cases: trains
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_lowers_the_loss_of_a_tiny_model(name, dtype, tokens):
    """float32: LoRA adapters (exact mode); bfloat16: every weight of the model, perturbed on the swap path and
    updated with stochastic rounding."""
    model = lora_model() if dtype == "float32" else tiny_llama().to(torch.bfloat16)
    engine = ZOEngine(model, eps=1e-3, seed=0,
                      optimizer=make_optimizer(name, **({"interval": 10} if name == "lozo" else {})))
    assert engine.exact == (dtype == "float32") and engine.swap == (dtype == "bfloat16")
    fn = loss_of(model, tokens)
    before, lr = fn(), TRAIN_LR[name][dtype == "bfloat16"]
    records = [engine.step(step, fn, 4 if name == "fzoo" else 2, lr) for step in range(30)]
    assert not any(r.rolled_back for r in records)
    assert fn() < before - 0.05, (before, fn())


# ---- resume ----------------------------------------------------------------------------------------

RESUME_OPTIONS = {"hizoo": {"hessian_smoothing": 0.5}, "lozo": {"rank": 2, "interval": 2, "momentum": 0.5},
                  "sparse": {"sparsity": 0.5}}  # LOZO-M: the resumed run's first step changes subspace
MODELS = {"adapters": (lora_model, 50_000_000), "in-place": (tiny_llama, 0),
          "bfloat16": (lambda: tiny_llama().to(torch.bfloat16), 0)}


def engine_for(name: str, kind: str) -> ZOEngine:
    build, copy_limit = MODELS[kind]
    return ZOEngine(build(), eps=1e-3, seed=3, copy_limit=copy_limit,
                    optimizer=make_optimizer(name, **RESUME_OPTIONS.get(name, {})))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_two_steps_then_a_resume_equal_four_steps_bit_for_bit(name, kind, tokens):
    """Momenta, Adam's moments and step count, HiZOO's Hessian, LOZO's subspace and moment: all in the state."""
    lr, queries = 1e-5 if name == "fzoo" else 1e-3, 2
    whole = engine_for(name, kind)
    assert whole.exact == (kind == "adapters")
    fn = loss_of(whole.model, tokens)
    for step in range(4):
        whole.step(step, fn, queries, lr)
    first = engine_for(name, kind)
    fn = loss_of(first.model, tokens)
    for step in range(2):
        first.step(step, fn, queries, lr)
    again = reloaded(first, engine_for(name, kind))
    fn = loss_of(again.model, tokens)
    for step in range(2, 4):
        again.step(step, fn, queries, lr)
    assert all(torch.equal(a, b) for a, b in zip(again.params, whole.params))
    assert not all(torch.equal(a, b) for a, b in zip(again.params, first.params))


def test_another_optimizers_state_is_refused_naming_it():
    module, loss_fn, *_ = toy()
    adam = ZOEngine(module, optimizer=make_optimizer("adam"))
    adam.step(0, loss_fn, 1, 1e-3)
    with pytest.raises(ValueError, match="written by optimiser 'adam', not 'momentum': resume with --zo-optimizer adam"):
        ZOEngine(module, optimizer=make_optimizer("momentum")).load_state_dict(adam.state_dict())
    older = {k: v for k, v in ZOEngine(module).state_dict().items() if k != "optimizer"}  # before optimisers: sgd's
    ZOEngine(module).load_state_dict(older)
    with pytest.raises(ValueError, match="written by optimiser 'sgd', not 'lozo'"):
        ZOEngine(module, optimizer=make_optimizer("lozo")).load_state_dict(older)


# ---- refusals --------------------------------------------------------------------------------------

def test_make_optimizer_names_the_valid_choices():
    with pytest.raises(ValueError, match="unknown zeroth-order optimizer 'mezo'; choose one of " + ", ".join(NAMES)):
        make_optimizer("mezo")
    with pytest.raises(ValueError, match="'sgd' does not take momentum; it takes directions$"):
        make_optimizer("sgd", momentum=0.9)
    with pytest.raises(ValueError, match="'lozo' does not take betas, sparsity; it takes directions, rank, interval, "
                                         "momentum"):
        make_optimizer("lozo", sparsity=0.5, betas=(0.9, 0.99), rank=None)
    with pytest.raises(ValueError, match="directions 'uniform'; choose one of gaussian, rademacher"):
        make_optimizer("adam", directions="uniform")
    assert make_optimizer("fzoo").kind == RADEMACHER and make_optimizer("lozo", rank=None).rank == 2  # None: default


def test_train_config_refuses_zo_optimizer_settings_on_a_first_order_method_and_options_not_taken():
    for given, named in (({"zo_optimizer": "adam"}, "zo_optimizer"), ({"zo_momentum": 0.5}, "momentum"),
                         ({"zo_rank": 4}, "rank")):
        with pytest.raises(ValueError, match=f"{named} apply to zeroth-order training; method 'lora'"):
            TrainConfig(method="lora", **given)
    with pytest.raises(ValueError, match="'adam' does not take sparsity"):
        TrainConfig(method="mezo-lora", zo_optimizer="adam", zo_sparsity=0.5)
    cfg = TrainConfig(method="mezo-lora", zo_optimizer="adam", zo_adam_betas=["0.8", "0.99"])
    assert make_optimizer(cfg.zo_optimizer, **cfg.zo_options()).betas == (0.8, 0.99)


def test_fzoo_with_one_query_is_refused_naming_zo_queries(tokens):
    """FZOO's sigma is the spread of the perturbed losses: one query has none. ``leanft train`` refuses it with
    the settings (AdaZeta's schedule starts at one query); a library user's engine at the first step, before
    any weight moved."""
    with pytest.raises(ValueError, match="fzoo needs at least 2 queries a step.*--zo-queries 2 or more"):
        TrainConfig(method="mezo-lora", zo_optimizer="fzoo", zo_queries=1)
    with pytest.raises(ValueError, match="AdaZeta's schedule starts at 1: use --zo-schedule fixed and --zo-queries"):
        TrainConfig(method="adazeta", zo_optimizer="fzoo", zo_queries=4)
    TrainConfig(method="adazeta", zo_optimizer="fzoo", zo_queries=4, zo_schedule="fixed")
    model = lora_model()
    objective = lambda net, batch: float(net(input_ids=batch, labels=batch).loss)
    step = optim.ZerothOrder(model, model, objective, 1e-5, queries=lambda epoch: 1, optimizer=make_optimizer("fzoo"))
    start = [p.detach().clone() for p in step.engine.params]
    with pytest.raises(ValueError, match="fzoo zeroth-order optimizer needs at least 2 queries a step, got 1: "
                                         "raise --zo-queries"):
        step.step(0, 0, [tokens])
    assert all(torch.equal(p, s) for p, s in zip(step.engine.params, start))


def test_a_lozo_state_is_refused_with_another_rank_or_momentum():
    """LOZO-M's moment has ``rank`` columns per matrix: another rank once failed in a tensor copy, and a resume
    without momentum dropped the moment silently."""
    module, loss_fn, *_ = toy()
    engine = ZOEngine(module, optimizer=make_optimizer("lozo", rank=2, momentum=0.5))
    engine.step(0, loss_fn, 1, 1e-3)
    for options in ({"rank": 3, "momentum": 0.5}, {"rank": 2}):
        with pytest.raises(ValueError, match="written by lozo with rank 2 with momentum, not rank .*--zo-rank and "
                                             "--zo-momentum"):
            ZOEngine(module, optimizer=make_optimizer("lozo", **options)).load_state_dict(engine.state_dict())
    plain = ZOEngine(module, optimizer=make_optimizer("lozo", rank=2)).state_dict()
    with pytest.raises(ValueError, match="written by lozo with no momentum, not rank 2 with momentum 0.5"):
        ZOEngine(module, optimizer=make_optimizer("lozo", rank=2, momentum=0.5)).load_state_dict(plain)
    ZOEngine(module, optimizer=make_optimizer("lozo", rank=3)).load_state_dict(plain)  # plain LOZO has no state


def test_swapped_weights_are_made_in_float32_under_autocast():
    """A bfloat16 forward under autocast must not compute the perturbed weights in bfloat16: LOZO's ``U V^T``
    is a matmul, which autocast would run in bfloat16 (a wrong direction, and a crash on a tensor drawn in
    pieces). The weights a module sees are the same with autocast on and off."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(700, 600).to(torch.bfloat16)  # 420,000 weights: two pieces
    x = torch.randn(3, 700, dtype=torch.bfloat16)
    engine = ZOEngine(layer, optimizer=make_optimizer("lozo", rank=2), copy_limit=0)
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(m.weight.detach().clone()))

    def loss():
        return float(layer(x).float().pow(2).mean())

    engine.query(5, loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.query(5, loss)
    hook.remove()
    assert len(seen) == 4 and torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
