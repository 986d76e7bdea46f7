"""Right in every precision: bfloat16/float16 runs train every trainable tensor in float32 under autocast,
full-model MeZO in low precision estimates what it claims, weight decay pulls towards the start."""

import pytest
import torch
from torch import nn

from leanft import loading, methods, objectives, optim, tasks
from leanft.config import TrainConfig
from leanft.precision import Precision
from leanft.tasks.collate import encode
from leanft.zo import ZOEngine, stochastic_round

LOW = ["bfloat16", "float16"]
EPS = 1e-3  # MeZO's perturbation: below half a bfloat16 unit in the last place of weights near 1
OPTIONS = {"loretta-adp": {"bottleneck": 8}, "adazeta": {"bottleneck": 8}}


def one_step(model_dir: str, method: str, dtype: str, lr: float = 1e-2, weight_decay: float = 0.0):
    """The model as ``leanft train`` builds it, its trainable tensors before, and the last of two steps."""
    cfg = TrainConfig(model=model_dir, method=method, dtype=dtype, method_options=OPTIONS.get(method, {}))
    task = tasks.get_task("sst2")
    # a fixed init, not whatever the tests before left in the RNG: with some (1 in 80) a LoRETTA_adp adapter of
    # the tiny model has received no gradient but its zero-initialised last core's after two steps, in float32
    # as in bfloat16 (seed 67), which is the adapter's start and the tiny model, not the precision under test
    torch.manual_seed(0)
    model, tokenizer, decoder = loading.build_model(cfg, [task])
    net = objectives.network(model, decoder)
    batch = encode(task, tasks.load_splits("sst2", 4, 0, 0).train, tokenizer, 64, decoder, training=True)
    precision = Precision(dtype, "cpu")
    objective = lambda net, b: objectives.batch_loss(net, b, decoder)[0]  # noqa: E731
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if method in methods.ZO_METHODS:
        step = optim.ZerothOrder(model, net, objective, lr, eps=1e-2, weight_decay=weight_decay,
                                 autocast=precision.autocast)
    else:
        step = optim.FirstOrder(model, net, objective, lr, weight_decay=weight_decay, autocast=precision.autocast,
                                scaler=precision.scaler())
    taken, rows = 0, []
    for i in range(20):  # two steps taken (LoRA's A moves from the second); float16 may skip while it scales
        rows.append(step.step(i, 0, [batch]))
        taken += not rows[-1].get("skipped")
        if taken == 2:
            break
    assert taken == 2, rows
    return model, before, rows[-1]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("method", methods.METHODS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_two_steps_move_every_trainable_tensor_and_they_are_float32(family, method, dtype, request):
    model, before, row = one_step(request.getfixturevalue(f"tiny_{family}_dir"), method, dtype)
    assert torch.isfinite(torch.tensor(row["loss"]))
    after = dict(model.named_parameters())
    still = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not still, f"{len(still)} trainable tensors did not move, e.g. {still[:3]}"
    expected = getattr(torch, dtype) if method == "mezo" else torch.float32  # full MeZO keeps its weights
    assert {p.dtype for p in before.values()} == {expected}
    if method not in ("mezo", "full"):  # the frozen base keeps the dtype it was loaded in
        assert any(p.dtype == getattr(torch, dtype) for p in model.parameters() if not p.requires_grad)


def test_norms_and_heads_train_in_float32_on_a_bfloat16_base(tiny_bert_dir):
    model, before, _ = one_step(tiny_bert_dir, "loretta-rep", "bfloat16")
    names = list(before)
    assert any("LayerNorm" in n for n in names) and any("classifier" in n for n in names)


class Linear(nn.Module):
    """``loss = sum(c * weight)`` read through the module's forward, as a model reads its weights."""

    def __init__(self, weight: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.c = nn.Parameter(weight), c

    def forward(self) -> torch.Tensor:
        return (self.c * self.weight.float()).sum()


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_drops_the_change():
    value = torch.full((100_000,), 1.0 + 1e-3)  # bfloat16's neighbours of 1.0 are 1.0 and 1.0078125
    assert torch.all(value.to(torch.bfloat16) == 1.0)
    rounded = stochastic_round(value, torch.bfloat16, torch.rand(value.shape, generator=torch.Generator().manual_seed(0)))
    p = 1e-3 / 2**-7
    stderr = 2**-7 * (p * (1 - p) / value.numel()) ** 0.5
    assert abs(rounded.float().mean().item() - (1.0 + 1e-3)) < 4 * stderr  # 4 standard errors


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_zo_update_is_unbiased_over_many_seeds(dtype):
    """A linear loss has gradient ``c`` everywhere: the mean SPSA update over seeds must be ``-lr c`` within
    4 standard errors, although each step's change (1e-3) is below half a unit in the last place."""
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 1.5, -0.5])
    lr, trials = 1e-3, 3000
    deltas = torch.empty(trials, len(c))
    for seed in range(trials):
        module = Linear(torch.ones(len(c), dtype=dtype), c)
        engine = ZOEngine(module, eps=1e-3, seed=seed)
        assert engine.rounded
        engine.step(0, lambda: float(module()), 1, lr)
        deltas[seed] = module.weight.detach().float() - 1.0
    mean, stderr = deltas.mean(0), deltas.std(0) / trials**0.5
    assert torch.all((mean + lr * c).abs() <= 4 * stderr + 1e-9), (mean, -lr * c, stderr)


@pytest.mark.slow
def test_low_precision_perturbation_changes_the_loss_as_float32_does(tiny_llama_dir):
    """The projected gradient of a bfloat16 full model along its seeds' directions tracks the float32 model's
    slope along the same directions (correlation over seeds), and is as large: the perturbation takes
    effect. Rounding ``theta + eps z`` to nearest instead would leave most weights where they were."""
    task = tasks.get_task("sst2")
    build = lambda dtype: loading.build_model(TrainConfig(model=tiny_llama_dir, method="mezo", dtype=dtype), [task])  # noqa: E731
    low, tokenizer, _ = build("bfloat16")
    batch = encode(task, tasks.load_splits("sst2", 8, 0, 0).train, tokenizer, 64, True, training=True)
    full = build("float32")[0].eval()
    loss = lambda model: float(objectives.batch_loss(objectives.network(model, True), batch, True)[0])  # noqa: E731
    engine = ZOEngine(low.eval(), eps=EPS)
    assert engine.rounded
    params = [p for p in full.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    ours, reference = [], []
    for seed in range(12):
        ours.append(engine.projected_gradient(seed, lambda: loss(low))[0])
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for i, (p, p0) in enumerate(zip(params, start)):
                    p.copy_(p0 + sign * EPS * engine.direction(seed, i))
            losses.append(loss(full))
        reference.append((losses[0] - losses[1]) / (2 * EPS))
    ours, reference = torch.tensor(ours), torch.tensor(reference)
    assert torch.corrcoef(torch.stack([ours, reference]))[0, 1] > 0.9, (ours, reference)
    assert (ours.norm() / reference.norm() - 1).abs() < 0.3


def test_low_precision_zo_restores_the_weights_exactly_and_replays(tiny_llama_dir):
    task = tasks.get_task("sst2")
    model, tokenizer, _ = loading.build_model(TrainConfig(model=tiny_llama_dir, method="mezo", dtype="bfloat16"), [task])
    net = objectives.network(model.eval(), True)
    batch = encode(task, tasks.load_splits("sst2", 4, 0, 0).train, tokenizer, 64, True, training=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(model, eps=1e-3)
    engine.projected_gradient(7, lambda: float(objectives.batch_loss(net, batch, True)[0]))
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters())
    records = [engine.step(s, lambda: float(objectives.batch_loss(net, batch, True)[0]), 2, 1e-2) for s in range(3)]
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    again = ZOEngine(model, eps=1e-3)
    for r in records:  # an update is a function of its seeds, projected gradients and lr alone
        again.apply(r.seeds, [g / len(r.grads) for g in r.grads], r.lr)  # sgd weighs each direction p_q / Q
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["loretta-rep", "loretta-adp", "lamda", "adazeta"])
def test_weight_decay_at_zero_loss_leaves_the_outputs_at_the_base_models(tiny_llama_dir, method):
    """With no gradient only weight decay acts: it must pull towards the start (the base model's outputs),
    not towards zero, which for a start kept as a frozen copy or an SVD start moves the model."""
    cfg = TrainConfig(model=tiny_llama_dir, method=method, method_options=OPTIONS.get(method, {}))
    task = tasks.get_task("sst2")
    model, tokenizer, decoder = loading.build_model(cfg, [task])
    net = objectives.network(model, decoder)
    batch = encode(task, tasks.load_splits("sst2", 4, 0, 0).train, tokenizer, 64, decoder, training=True)
    zero = lambda net, b: 0.0 * objectives.batch_loss(net, b, decoder)[0]  # noqa: E731
    if method != "loretta-adp":  # its default zero-core start is at zero: no anchor needed
        assert optim.start_anchors(model), "the method's start is a frozen copy: decay needs an anchor"
    model.eval()
    with torch.no_grad():
        base = net(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], batch["targets"])
    if method in methods.ZO_METHODS:
        step = optim.ZerothOrder(model, net, zero, 1e-2, weight_decay=0.1)
    else:
        step = optim.FirstOrder(model, net, zero, 1e-2, weight_decay=0.1, method_schedule=False)
    for i in range(20):
        step.step(i, 0, [batch])
    model.eval()
    with torch.no_grad():
        after = net(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], batch["targets"])
    torch.testing.assert_close(after, base, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_low_precision_perturbation_of_weights_near_one_takes_effect_on_average(tiny_llama_dir):
    """The final norm's weights are 1.0, where bfloat16's unit in the last place is 2**-7: a perturbation of
    1e-3 z rounded to nearest would vanish. What the module reads during the perturbed forward must be
    ``1 + eps z`` on average (slope 1 against z)."""
    task = tasks.get_task("sst2")
    model, tokenizer, _ = loading.build_model(TrainConfig(model=tiny_llama_dir, method="mezo", dtype="bfloat16"), [task])
    batch = encode(task, tasks.load_splits("sst2", 2, 0, 0).train, tokenizer, 64, True, training=True)
    net, norm = objectives.network(model.eval(), True), model.model.norm
    assert torch.all(norm.weight == 1.0)
    seen = []
    norm.register_forward_hook(lambda module, args, out: seen.append(module.weight.detach().float().clone()))
    engine = ZOEngine(model, eps=EPS)
    index = next(i for i, p in enumerate(engine.params) if p is norm.weight)
    moved, directions = [], []
    for seed in range(40):
        seen.clear()
        engine.projected_gradient(seed, lambda: float(objectives.batch_loss(net, batch, True)[0]))
        moved.append((seen[0] - 1.0) / EPS)  # the + forward
        directions.append(engine.direction(seed, index))
    moved, z = torch.cat(moved), torch.cat(directions)
    assert torch.all(norm.weight == 1.0)  # restored exactly
    slope = (moved * z).mean() / (z * z).mean()
    assert abs(slope - 1) < 0.15, slope  # rounding to nearest gives about 0.27


@pytest.mark.parametrize("dtype", LOW)
def test_full_fine_tuning_in_low_precision_is_refused_with_what_to_use(tiny_llama_dir, tmp_path, dtype):
    """Its float32 master weights would move below the resolution of the copies the forward computes with:
    the model that trains would not be the one saved."""
    from leanft import train

    with pytest.raises(ValueError, match=f"full fine-tuning with --dtype {dtype} is refused.*Use --dtype float32"):
        train.train(TrainConfig(model=tiny_llama_dir, method="full", dtype=dtype, output_dir=str(tmp_path)))


def adapted(family: str, method: str, move: float = 0.2, **options):
    """A tiny bfloat16 model with ``method``'s float32 adapters, moved off their start by ``move`` N(0, 1)."""
    from conftest import FAMILIES
    from peft import get_peft_model

    build, task_type = FAMILIES[family]
    model = get_peft_model(build().to(torch.bfloat16), methods.make_config(method, task_type, **options)).eval()
    with torch.no_grad():
        noise = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(move * torch.randn(p.shape, generator=noise))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    return model


def bf16_loss(model, grad: bool = False):
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 0] % 3 if model.config.model_type == "bert" else tokens
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=tokens, labels=labels).loss


ADAPTERS = {"mezo-lora": ("llama", {"rank": 4}), "adazeta": ("llama", {"bottleneck": 8, "tt_rank": 2}),
            "loretta-rep": ("bert", {"rank": 4, "tt_rank": 2, "tt_classifier": True,
                                     "classifier_dense": "bert.pooler.dense", "init_mode": "zero_core"})}


@pytest.mark.parametrize("method", ADAPTERS)
def test_perturbed_forward_under_bfloat16_autocast_applies_eps_z_to_float32_adapters(method):
    """Autocast casts float32 adapters to bfloat16 inside the forward, and 1e-3 z is below half a unit of
    elements near 0.2 or above: the forward saw the perturbation rounded, with many elements not moved at
    all (LoRA factors, LoRETTA's TT cores, the TT head). Each module holding trainable tensors must compute
    its output from theta +- eps z exactly as float32 does."""
    family, options = ADAPTERS[method]
    model = adapted(family, method, **options)
    engine = ZOEngine(model, eps=EPS)
    owners = {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    checked = []

    def compare(module, args, output):  # runs inside the perturbed forward, before the engine's own hooks
        with torch.autocast("cpu", enabled=False):
            expected = module.forward(*[a.float() if a.is_floating_point() else a for a in args])
        torch.testing.assert_close(output.float(), expected, rtol=1e-5, atol=1e-6)
        checked.append(module)

    hooks = [m.register_forward_hook(compare) for m in owners]
    engine.projected_gradient(3, lambda: float(bf16_loss(model)))
    for h in hooks:
        h.remove()
    assert set(checked) == owners
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())  # the base stays bfloat16


def test_zo_slope_of_tt_factors_read_outside_their_forward_is_the_float32_slope():
    """LoRETTA_rep with its noise-free start multiplies dense TT factors inside the adapter layer's own
    forward, not the factors' modules: the layer computes in float32 around its bfloat16 base layer, so the
    projected gradients follow the exact slope of the float32 adapters along each direction (autograd)."""
    model = adapted("llama", "loretta-rep", move=0.05, rank=4, tt_rank=2, init_mode="noise_free")
    engine = ZOEngine(model, eps=EPS)
    from leanft.zo.compute import float32_compute as _float32_compute

    with _float32_compute(*engine.regions):
        exact = torch.autograd.grad(bf16_loss(model, grad=True), engine.params)
    ours, slope = [], []
    for seed in range(40):
        ours.append(engine.projected_gradient(seed, lambda: float(bf16_loss(model)))[0])
        slope.append(float(sum((g * engine.direction(seed, i)).sum() for i, g in enumerate(exact))))
    ours, slope = torch.tensor(ours), torch.tensor(slope)
    assert torch.nn.functional.cosine_similarity(ours, slope, dim=0) > 0.93  # factors rounded to bfloat16: 0.87
    assert abs(ours.norm() / slope.norm() - 1) < 0.15


def test_bfloat16_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    """The engine's integer form of stochastic rounding to bfloat16: each result is one of the value's two
    bfloat16 neighbours, and the mean over seeds is the value (rounding to nearest would give the nearer
    neighbour every time: a bias of up to half a unit in the last place)."""
    layer = torch.nn.Linear(64, 1, bias=False).to(torch.bfloat16)
    engine = ZOEngine(layer, eps=1e-3, copy_limit=0)
    value = torch.linspace(-3, 3, 64) + 1e-3  # mostly between two bfloat16 numbers
    down = value.to(torch.bfloat16).float()
    up = torch.nextafter(value.to(torch.bfloat16), torch.where(value > down, float("inf"), float("-inf"))
                         .to(torch.bfloat16)).float()
    out = torch.empty(64, dtype=torch.bfloat16)
    draws = []
    for seed in range(2000):
        engine._round_into(out, value.clone(), 0, 0, 64, seed, 3)
        draws.append(out.float().clone())
    draws = torch.stack(draws)
    assert bool(((draws == down) | (draws == up)).all())
    gap = (up - down).abs()
    assert float(((draws.mean(0) - value).abs() / gap).max()) < 0.05  # 2000 draws: sd of the mean <= 0.011 gap
    assert float(((value.to(torch.bfloat16).float() - value).abs() / gap).max()) > 0.3  # nearest is biased
