import math
import warnings

import pytest
import torch
from conftest import reloaded, tiny_llama
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from leanft import LorettaAdpConfig
from leanft.optim import decays
from leanft.zo import ZOEngine, query_schedule, query_seed
from leanft.zo.noise import BLOCK, mix


def lora_model(dtype=torch.float32):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.to(dtype)


def loss_of(model, tokens):
    def fn() -> float:
        with torch.no_grad():
            return float(model(input_ids=tokens, labels=tokens).loss)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameters_are_restored_bit_for_bit(dtype, tokens):
    model = lora_model(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(model, eps=1e-2)
    g, plus = engine.projected_gradient(1234, loss_of(model, tokens))
    assert math.isfinite(g) and g != 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_in_place_mode_for_large_sets_also_restores_closely(tokens):
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = ZOEngine(model, eps=1e-3, copy_limit=0)
    assert not engine.exact
    engine.projected_gradient(7, loss_of(model, tokens))
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def directions(params, seed):
    """``z`` by the rule leanft.zo.noise documents: the trainable tensors laid end to end (one device here),
    cut into blocks of ``BLOCK`` elements, block ``k`` drawn by ``randn`` from a generator seeded with
    ``mix(seed, 0, 0, k)`` (stream 0: directions; device group 0)."""
    total = sum(p.numel() for p in params)
    blocks = [torch.randn(min(BLOCK, total - k * BLOCK), generator=torch.Generator().manual_seed(mix(seed, 0, 0, k // BLOCK)))
              for k in range(0, total, BLOCK)]
    flat = torch.cat(blocks)
    out, at = [], 0
    for p in params:
        out.append(flat[at:at + p.numel()].view(p.shape))
        at += p.numel()
    return out


def quadratic():
    """Two trainable tensors and a loss ``0.5 |A w + B v - c|^2`` (in float64) with its exact gradient."""
    gen = torch.Generator().manual_seed(0)
    A, B, c = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((30, 12), (30, 8), (30,)))
    module = torch.nn.Module()
    module.w, module.v = (torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (12, 8))

    def loss_at(w, v) -> float:
        return float(0.5 * (A @ w.double() + B @ v.double() - c).pow(2).sum())

    def gradient():
        r = A @ module.w.detach().double() + B @ module.v.detach().double() - c
        return A.T @ r, B.T @ r

    return module, (lambda: loss_at(module.w, module.v)), loss_at, gradient


def test_a_step_takes_the_slope_along_each_seeds_direction_and_moves_by_its_mean():
    """On a quadratic the central difference is exact: ``p_q = grad . z_q`` with ``z_q`` drawn from the
    query's documented seed, ``l+`` is the loss at ``theta + eps z_q``, and the step moves the parameters
    to ``theta - lr * mean_q p_q z_q``."""
    module, loss_fn, loss_at, gradient = quadratic()
    engine = ZOEngine(module, eps=1e-2, seed=5)
    theta, grad = [p.detach().clone() for p in engine.params], gradient()
    record = engine.step(3, loss_fn, queries=4, lr=1e-3)
    assert record.seeds == [query_seed(5, 3, q) for q in range(4)] and record.lr == 1e-3
    zs = [directions(theta, seed) for seed in record.seeds]
    slopes = [float(sum((g * z.double()).sum() for g, z in zip(grad, z_q))) for z_q in zs]
    assert record.grads == pytest.approx(slopes, rel=1e-4, abs=1e-6)
    plus = [loss_at(*(t + 1e-2 * z for t, z in zip(theta, z_q))) for z_q in zs]
    assert record.loss == pytest.approx(sum(plus) / 4, rel=1e-6)
    for i, p in enumerate(engine.params):
        expected = theta[i] - 1e-3 * sum(g * z_q[i] for g, z_q in zip(record.grads, zs)) / 4
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_many_queries_move_the_parameters_down_the_true_gradient():
    """``E[p z] = grad``: with 500 queries one step moves ``theta`` along ``-lr * grad``, in direction
    and in size."""
    module, loss_fn, _, gradient = quadratic()
    engine = ZOEngine(module, eps=1e-3, seed=0)
    theta, grad = torch.cat([p.detach().clone() for p in engine.params]), torch.cat(gradient()).float()
    engine.step(0, loss_fn, queries=500, lr=1e-3)
    moved = (theta - torch.cat([p.detach() for p in engine.params])) / 1e-3
    assert torch.nn.functional.cosine_similarity(moved, grad, dim=0) > 0.9
    assert 0.8 < float(moved.norm() / grad.norm()) < 1.25


def test_update_follows_the_formula_and_skips_decay_on_biases_and_norms(tokens):
    model = get_peft_model(tiny_llama(), LorettaAdpConfig(bottleneck_size=16))  # TT cores, biases, norms
    engine = ZOEngine(model, weight_decay=0.1, decays=decays)
    assert {decays(p) for p in engine.params} == {True, False}
    before = [p.detach().clone() for p in engine.params]
    engine.apply([11, 22], [0.5 / 2, -1.5 / 2], lr=0.01)  # the weights of the directions: p_q / Q for sgd
    z = [directions(engine.params, s) for s in (11, 22)]
    for i, (name, p) in enumerate(engine.named):
        wd = 0.0 if ("bias" in name or "norm" in name) else 0.1
        assert p.ndim < 2 if wd == 0.0 else p.ndim >= 2, name
        expected = before[i] * (1 - 0.01 * wd) - 0.01 * (0.5 * z[0][i] + -1.5 * z[1][i]) / 2
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)


def test_query_schedule_values():
    assert [query_schedule(e) for e in (0, 1, 8, 9, 100, 10_000)] == [1, 1, 2, 2, 6, 20]
    assert [query_schedule(e, beta=0.4, q_max=15) for e in (8, 9, 100, 159)] == [1, 2, 5, 6]  # METHODS.md 5.4
    assert query_schedule(50, q_min=3) == 4 and query_schedule(0, q_min=3) == 3
    assert query_seed(0, 5, 1) != query_seed(0, 5, 2) and query_seed(0, 5, 1) == query_seed(0, 5, 1)


def test_each_stage_of_a_sequential_run_draws_its_own_directions_and_stage_0_keeps_the_old_seeds(tokens):
    """Every stage restarts at step 0: without the stage in the seed, stage 2 would replay stage 1's
    directions. Stage 0 (every single-stage run) keeps the seeds it always had."""
    assert [query_seed(42, 0, q) for q in range(2)] == [3444837047, 1896493428]
    seeds = [ZOEngine(lora_model(), seed=42, stage=stage).step(0, loss_of(lora_model(), tokens), 2, 1e-3).seeds
             for stage in (0, 1, 2)]
    assert seeds[0] == [3444837047, 1896493428]
    assert len({s for stage in seeds for s in stage}) == 6


def quantised(model, tokens):
    """A loss that a perturbation of 1e-3 almost never moves (a step function of the true loss)."""
    return lambda: round(loss_of(model, tokens)(), 1)


@pytest.mark.slow
def test_a_healthy_model_whose_loss_no_query_moves_takes_a_normal_step_not_a_rollback(tokens):
    """``l+ == l-`` on every query happens to healthy models (a perturbation below the compute precision, a
    piecewise-constant loss); it once rolled back the previous good update and halved the lr each time. Now
    one unperturbed forward looks for overflowed activations, finds none, and the step is a normal one with
    zero projected gradient: weight decay applies, and a long run of them warns once that eps may be too
    small."""
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        init_lora_weights=False))
    engine = ZOEngine(model, eps=1e-3, weight_decay=0.1, decays=decays)
    fn, start = quantised(model, tokens), [p.detach().clone() for p in engine.params]
    with pytest.warns(UserWarning, match="20 zeroth-order steps in a row left the loss exactly unchanged.*--zo-eps"):
        records = [engine.step(s, fn, queries=2, lr=1e-2) for s in range(20)]
    assert not any(r.rolled_back for r in records) and engine.lr_scale == 1.0
    assert all(r.grads == [0.0, 0.0] for r in records) and engine.last_forwards == 2 * 2 + 1
    for p, p0 in zip(engine.params, start):  # decay only: theta * (1 - lr wd)^20
        torch.testing.assert_close(p, p0 * (1 - 1e-2 * 0.1) ** 20, rtol=1e-5, atol=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*zeroth-order steps in a row")  # once only
        engine.step(20, fn, queries=2, lr=1e-2)


def test_the_overflow_check_is_a_counted_forward(tokens):
    """The check's forward counts in the step's forwards (and so in the budget and in forward_passes)."""
    model = lora_model()
    objective = lambda net, batch: round(float(net(input_ids=batch, labels=batch).loss), 1)  # noqa: E731
    step = optim.ZerothOrder(model, model, objective, 1e-3, queries=lambda epoch: 3)
    row = step.step(0, 0, [tokens])
    assert row["forwards"] == 7 and step.forwards == 7 and not row.get("rolled_back")


def test_divergence_rolls_back_and_halves_the_learning_rate(tokens):
    model = lora_model()
    engine = ZOEngine(model, eps=1e-3)
    fn = loss_of(model, tokens)
    engine.step(0, fn, queries=2, lr=1e-3)
    before_last = [p.detach().clone() for p in engine.params]
    engine.step(1, fn, queries=2, lr=1e-3)
    record = engine.step(2, lambda: float("nan"), queries=2, lr=1e-3)
    assert record.rolled_back and engine.lr_scale == 0.5
    for p, b in zip(engine.params, before_last):
        assert torch.equal(p, b)
    assert engine.step(3, fn, queries=1, lr=1e-3).lr == pytest.approx(5e-4)


def scripted(losses):
    """A loss function that returns ``losses`` in turn (one value per query: l+ then l- get the same)."""
    values = iter(losses)
    current = {}

    def fn() -> float:
        if not current:
            current["v"] = next(values)
            return current["v"]
        return current.pop("v") + 1e-6  # l-: a small, finite projected gradient
    return fn


def test_outlier_batches_are_not_divergence_but_an_opt_in_threshold_rolls_them_back(tokens):
    """A running loss of 0.03 and two batches at 0.35-0.4 once halved the lr for good; by default only a
    non-finite loss or projected gradient is divergence, and ``blowup`` makes the old test opt-in."""
    sequence = [0.03] * 6 + [0.35, 0.4] + [0.03] * 4
    for blowup, expected in ((0.0, []), (10.0, [6, 7])):
        engine = ZOEngine(lora_model(), eps=1e-3, blowup=blowup, recover=3)
        fn = scripted(sequence)
        records = [engine.step(s, fn, queries=1, lr=1e-3) for s in range(len(sequence))]
        assert [r.step for r in records if r.rolled_back] == expected
        lrs = [r.lr / 1e-3 for r in records]
        assert lrs == ([1.0] * 12 if not blowup else [1.0] * 7 + [0.5, 0.25, 0.25, 0.25, 0.5])
        assert engine.lr_scale == (1.0 if not blowup else 0.5)  # recovering: doubles after every 3 good steps


def resumed(engine: ZOEngine, build) -> ZOEngine:
    """A fresh model and engine given ``engine``'s parameters and ``state_dict`` (through bytes, as a
    checkpoint stores them)."""
    return reloaded(engine, ZOEngine(build(), eps=engine.eps, recover=engine.recover))


def test_a_nan_is_rolled_back_the_lr_recovers_and_a_resume_mid_recovery_agrees(tokens):
    sequence = [1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]
    engine = ZOEngine(lora_model(), eps=1e-3, recover=2)
    fn = scripted(sequence)
    records = [engine.step(s, fn, queries=1, lr=1e-3) for s in range(len(sequence))]
    assert [r.rolled_back for r in records] == [False, False, True, False, False, False, False]
    assert [r.lr / 1e-3 for r in records] == [1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0]
    first = ZOEngine(lora_model(), eps=1e-3, recover=2)
    fn = scripted(sequence[:4])
    for s in range(4):  # up to one step into the recovery, lr still halved
        first.step(s, fn, queries=1, lr=1e-3)
    again, fn = resumed(first, lora_model), scripted(sequence[4:])
    later = [again.step(s, fn, queries=1, lr=1e-3) for s in range(4, len(sequence))]
    assert [r.lr / 1e-3 for r in later] == [0.5, 1.0, 1.0]  # the halved lr doubles back on schedule
    assert all(torch.equal(a, b) for a, b in zip(again.params, engine.params))
    assert all(torch.equal(a, b) for a, b in zip(again.good, engine.good))  # a later rollback lands alike


def test_divergence_that_persists_stops_with_a_clear_error(tokens):
    engine = ZOEngine(lora_model(), eps=1e-3, max_rollbacks=3)
    fn = scripted([1.0] + [float("inf")] * 10)
    engine.step(0, fn, queries=1, lr=1e-3)
    for s in range(1, 4):
        assert engine.step(s, fn, queries=1, lr=1e-3).rolled_back
    with pytest.raises(FloatingPointError, match="rolled back 3 steps in a row"):
        engine.step(4, fn, queries=1, lr=1e-3)


def test_with_the_guard_off_the_first_non_finite_step_stops_and_leaves_the_parameters_finite(tokens):
    model = lora_model()
    engine = ZOEngine(model, eps=1e-3, max_rollbacks=0)
    fn = scripted([1.0, float("nan")])
    engine.step(0, fn, queries=1, lr=1e-3)
    after_good = [p.detach().clone() for p in engine.params]
    with pytest.raises(FloatingPointError, match="guard is off"):
        engine.step(1, fn, queries=1, lr=1e-3)
    assert all(torch.equal(a, p) for a, p in zip(after_good, engine.params))


def test_activations_that_overflow_into_a_finite_loss_are_divergence_not_convergence(tokens):
    """Hidden states beyond 1.8e19 square to inf in float32 and RMSNorm maps them to zeros: the loss is then
    exactly ln(vocab), finite, and no perturbation moves it. That once ran on silently for hundreds of steps
    (an AdaZeta run at lr 3e-3); it is divergence, rolled back with the guard on and a stop with it off."""
    for max_rollbacks in (5, 0):
        model = lora_model()
        engine = ZOEngine(model, eps=1e-3, max_rollbacks=max_rollbacks)
        fn = loss_of(model, tokens)
        healthy = [p.detach().clone() for p in engine.params]
        engine.step(0, fn, queries=1, lr=1e-3)  # the update the rollback undoes
        with torch.no_grad():
            model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.fill_(1e24)
        assert fn() == pytest.approx(math.log(128))  # finite: nothing else would stop this run
        if max_rollbacks:
            record = engine.step(1, fn, queries=2, lr=1e-3)
            assert record.rolled_back and record.grads == [0.0, 0.0] and engine.lr_scale == 0.5
            assert all(torch.equal(p, h) for p, h in zip(engine.params, healthy))
            assert abs(fn() - math.log(128)) > 1e-3  # a working model again
        else:
            with pytest.raises(FloatingPointError, match=r"did not change under any perturbation.*guard is off"):
                engine.step(1, fn, queries=2, lr=1e-3)


def test_a_resumed_engine_continues_exactly_and_checks_what_it_is_given(tokens):
    model = lora_model()
    engine = ZOEngine(model, eps=1e-2)
    fn = loss_of(model, tokens)
    for t in range(4):  # step 3 diverges and is rolled back
        engine.step(t, fn if t != 3 else (lambda: float("inf")), queries=1 + t % 3, lr=1e-2)
    again = resumed(engine, lora_model)
    again_fn = loss_of(again.model, tokens)
    for t in range(4, 7):
        engine.step(t, fn, queries=1 + t % 3, lr=1e-2)
        again.step(t, again_fn, queries=1 + t % 3, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(again.params, engine.params))
    assert again.state_dict()["lr_scale"] == engine.state_dict()["lr_scale"] == 0.5
    with pytest.raises(ValueError, match="other trainable tensors"):
        ZOEngine(tiny_llama(), eps=1e-2).load_state_dict(engine.state_dict())
    with pytest.warns(UserWarning, match="drew its directions on cuda and continues on cpu"):
        again.load_state_dict({**engine.state_dict(), "device_type": "cuda"})


# ---- through the trainer -------------------------------------------------------------------------

import json  # noqa: E402

from leanft import (  # noqa: E402
    loading,
    objectives,
    optim,
    runfolder,
    train,  # noqa: E402
)
from leanft.config import TrainConfig  # noqa: E402


def zo_cfg(model_dir, out, **kw) -> TrainConfig:
    base = dict(model=model_dir, method="mezo-lora", task="sst2", num_train=8, num_dev=4, num_eval=4, max_steps=6,
                batch_size=4, eval_every=3, eval_before=False, output_dir=str(out), lr=1e-3, zo_eps=1e-2,
                method_options={"rank": 2}, zo_queries=2)
    return TrainConfig(**{**base, **kw})


def rows_of(out) -> list[dict]:
    """The run's logged steps, without the timings."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


@pytest.mark.slow
def test_adazeta_trains_with_the_query_schedule_and_frozen_norms(tiny_llama_dir, tmp_path):
    metrics = train.train(zo_cfg(tiny_llama_dir, tmp_path, method="adazeta", zo_alpha=2.0, zo_beta=1.0, zo_q_max=3,
                                 method_options={"bottleneck": 8, "tt_rank": 2}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 8 examples / batch 4 = 2 steps per epoch: epochs 0,0,1,1,2,2 -> Q = min(max(floor(2 e), 1), 3)
    assert [r["queries"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert metrics["config"]["method"] == "adazeta" and metrics["steps"] == 6
    model, _, _ = loading.build_model(zo_cfg(tiny_llama_dir, tmp_path, method="adazeta",
                                        method_options={"bottleneck": 8, "tt_rank": 2}), [loading.tasks.get_task("sst2")])
    assert not any("norm" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_zo_resume_mid_recovery_continues_to_the_identical_run(tiny_llama_dir, tmp_path, monkeypatch):
    """Step 2 diverges (rolled back, lr halved); the run is checkpointed at step 3 and crashes: the resumed run
    keeps the halved lr until the guard doubles it back, and ends as the uninterrupted one."""
    real_step, real_loss, now = optim.ZerothOrder.step, objectives.mean_loss, {}

    def step(self, step, epoch, batches):
        now["step"] = step
        return real_step(self, step, epoch, batches)

    def loss(net, batches, decoder):
        value = real_loss(net, batches, decoder)
        return value * float("nan") if now.get("step") == 1 else value

    monkeypatch.setattr(optim.ZerothOrder, "step", step)
    monkeypatch.setattr(objectives, "mean_loss", loss)
    cfg = dict(scheduler="constant", zo_recover=3)
    train.train(zo_cfg(tiny_llama_dir, tmp_path / "full", **cfg))
    real = runfolder.save_checkpoint

    def crash(*args):
        real(*args)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(runfolder, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(zo_cfg(tiny_llama_dir, tmp_path / "cut", **cfg))
    assert len(rows_of(tmp_path / "cut")) == 3
    monkeypatch.setattr(runfolder, "save_checkpoint", real)
    train.train(zo_cfg(tiny_llama_dir, tmp_path / "cut", resume=True, **cfg))
    rows = rows_of(tmp_path / "cut")
    assert rows == rows_of(tmp_path / "full")  # losses, projected gradients, lrs
    assert [r.get("rolled_back", False) for r in rows] == [False, True, False, False, False, False]
    assert [r["lr"] / 1e-3 for r in rows] == [1.0, 1.0, 0.5, 0.5, 0.5, 1.0]  # back after 3 good steps
    full = load_file(str(tmp_path / "full" / "best" / "adapter_model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "best" / "adapter_model.safetensors"))
    assert all(torch.equal(full[k], cut[k]) for k in full)


@pytest.mark.slow
def test_zo_divergence_in_training_is_rolled_back_and_reported(tiny_llama_dir, tmp_path, monkeypatch):
    real = objectives.mean_loss
    calls = {"n": 0}

    def nan_later(net, batches, decoder):
        calls["n"] += 1
        loss = real(net, batches, decoder)
        return loss * float("nan") if 9 <= calls["n"] <= 12 else loss  # step 3's queries (2 x 2 forwards)

    monkeypatch.setattr(objectives, "mean_loss", nan_later)
    train.train(zo_cfg(tiny_llama_dir, tmp_path, num_dev=0, scheduler="constant"))
    rows = rows_of(tmp_path)
    assert [r.get("rolled_back", False) for r in rows] == [False, False, True, False, False, False]
    assert rows[3]["lr"] == pytest.approx(rows[1]["lr"] / 2)  # the lr the step used: halved after the rollback
    assert [r.get("diverged") for r in rows if r.get("rolled_back")] == ["non-finite loss or projected gradient"]


@pytest.mark.slow
def test_forward_pass_budget_is_exact(tiny_llama_dir, tmp_path, monkeypatch):
    real, calls = objectives.mean_loss, {"n": 0}

    def counted(net, batches, decoder):  # one call = one forward pass of the step's batch
        calls["n"] += 1
        return real(net, batches, decoder)

    monkeypatch.setattr(objectives, "mean_loss", counted)
    metrics = train.train(zo_cfg(tiny_llama_dir, tmp_path, max_steps=100, max_forwards=10, zo_queries=3, num_dev=0))
    assert metrics["forward_passes"] == calls["n"] == 10 and metrics["steps"] == 2
    assert [r["queries"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [3, 2]


def test_odd_forward_budget_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="max-forwards 9 is odd"):
        train.train(zo_cfg(tiny_llama_dir, tmp_path, max_forwards=9, num_dev=0))
