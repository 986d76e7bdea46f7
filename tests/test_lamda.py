"""LaMDA / LaMDA++: SVD start, P_B freezing schedule, rank allocation, merge, save/load, meta counts."""

import json
import random

import pytest
import torch
from conftest import FAMILIES, out, perturb, tiny_bert, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import DebertaConfig, DebertaModel

from leanft import LamdaConfig, optim
from leanft.methods import count_parameters
from leanft.models import meta_model
from leanft.tuners.lamda import lamda_ranks
from leanft.tuners.lamda import layer as lamda_layer
from leanft.tuners.lamda.schedule import allocate, frozen_count

INITS = ["svd_residual", "svd_zero", "svd_identity"]
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lamda(family: str, **kwargs) -> PeftModel:
    build, task = FAMILIES[family]
    return get_peft_model(build(), LamdaConfig(task_type=task, **kwargs))


def layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lamda_S")}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("init", INITS)
def test_svd_start_and_exact_pretrained_outputs(family, init, tokens):
    build = FAMILIES[family][0]
    base_model = build()
    base, weights = out(base_model, tokens), {k: v.clone() for k, v in base_model.state_dict().items()}
    model = lamda(family, lamda_init=init)
    assert torch.equal(out(model, tokens), base)
    found = layers(model)
    assert {n.rsplit(".", 1)[-1] for n in found} == ({"q_proj", "v_proj"} if family == "llama" else {"query", "value"})
    for name, layer in found.items():
        w = layer.base_layer.weight
        assert torch.equal(w, weights[name + ".weight"])  # W0 is never modified
        a, b, s0 = layer.lamda_A["default"], layer.lamda_B["default"], layer.lamda_S["default"]
        u_full, sigma_full, vh_full = torch.linalg.svd(w, full_matrices=False)
        sigma, scale = sigma_full[:8], 16 / 8
        # rows of P_A: the top right singular vectors (times sqrt(sigma) for svd_identity), P_B = W v / sigma
        c = sigma.sqrt() if init == "svd_identity" else torch.ones(8)
        v = a / c[:, None]
        torch.testing.assert_close(v @ v.T, torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close((w @ v.T).norm(dim=0), sigma, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, (w @ v.T) / sigma * c, atol=1e-5, rtol=1e-4)
        top = u_full[:, :8] @ torch.diag(sigma) @ vh_full[:8]
        if init == "svd_zero":
            assert not s0.any() and not layer.lamda_S0
        else:
            expected_s0 = torch.eye(8) / scale if init == "svd_identity" else torch.diag(sigma) / scale
            torch.testing.assert_close(s0, expected_s0)
            start = scale * layer.lamda_B0["default"] @ layer.lamda_S0["default"] @ a
            torch.testing.assert_close(start, top, atol=1e-5, rtol=1e-4)
            # the effective base is the residual: its spectrum is sigma_9, sigma_10, ...
            residual = torch.linalg.svdvals(w - start)
            torch.testing.assert_close(residual[: len(sigma_full) - 8], sigma_full[8:], atol=1e-5, rtol=1e-4)
    perturb(model)
    assert (out(model, tokens) - base).abs().max() > 1e-4  # the adapter is live


def test_defaults_and_only_s_and_p_b_are_trainable(tokens):
    config = LamdaConfig()
    assert (config.r, config.lamda_alpha, config.lamda_dropout, config.lamda_init, config.train_norms) \
        == (8, 16, 0.0, "svd_residual", False)
    assert (config.freeze_fraction, config.freeze_order, config.rank_allocation) == (0.3, "top_first", "uniform")
    model = lamda("llama").train()
    perturb(model)
    model(input_ids=tokens).logits.pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lamda_S." in n or ".lamda_B." in n for n in trainable)
    assert {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == trainable
    deberta = DebertaModel(DebertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=64))
    deberta = lamda_ranks(deberta, LamdaConfig())
    assert list(deberta) == ["encoder.layer.0.attention.self.in_proj"]


def test_all_seven_llama_projections():
    model = lamda("llama", r=4, target_modules=ALL_LLAMA)
    assert len(layers(model)) == 14
    # per layer S: 7 * 16; P_B: 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert model.base_model.trainable_counts() == {"S": 224, "P_B": 4096, "other": 0, "total": 4320}


def test_freezing_schedule_is_exact():
    assert [frozen_count(4, k, 10, 0.3) for k in range(11)] == [0, 1, 2, 4, 4, 4, 4, 4, 4, 4, 4]  # 0.3 * 10 is 3
    assert [frozen_count(8, k, 20, 0.25) for k in range(7)] == [0, 1, 3, 4, 6, 8, 8]
    for order, expected in [("top_first", [[], [0], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3]]),
                            ("bottom_first", [[], [3], [2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])]:
        model = lamda("llama", r=4, freeze_order=order)
        seen, totals = [], []
        for k in range(5):
            totals.append(model.base_model.update_freezing(k, 10))
            cols = {tuple(range(4)[layer.frozen_columns("default")]) for layer in layers(model).values()}
            assert len(cols) == 1  # the same columns in every module
            seen.append(list(cols.pop()))
        assert seen == expected
        assert totals == [0, 4, 8, 16, 16]  # 4 adapted modules


@pytest.mark.parametrize("init", ["svd_residual", "svd_zero"])  # P_B decays towards its SVD start / towards zero
def test_frozen_columns_never_move_under_leanfts_adamw_with_weight_decay(init, tokens):
    """Through ``leanft.optim.FirstOrder``, which ``leanft train`` steps with: neither AdamW's own decay and
    momentum (svd_zero) nor the decay towards the start (svd_residual) moves a frozen column, before or after
    all of P_B is frozen, while S and the live columns train."""
    model = lamda("llama", r=4, freeze_fraction=0.5, lamda_init=init).train()
    found = layers(model)
    total, history, frozen_grads = 8, [], []
    start = {n: m.lamda_B["default"].detach().clone() for n, m in found.items()}
    for layer in found.values():  # frozen columns get no gradient (nor do they count in the clipped norm)
        layer.lamda_B["default"].register_post_accumulate_grad_hook(
            lambda p, layer=layer: frozen_grads.append(p.grad[:, layer.frozen_columns("default")].any()))
    step = optim.FirstOrder(model, model, lambda net, t: net(input_ids=t, labels=t).loss, 1e-2, weight_decay=0.1,
                            total_steps=total)
    assert bool(step.anchors) == (init == "svd_residual")
    for k in range(total):
        row = step.step(k, 0, [tokens])
        assert row["updated_params"] > 0 and row["grad_norm"] > 0
        history.append({n: (m.lamda_B["default"].detach().clone(), m.lamda_S["default"].detach().clone(),
                            m.frozen_columns("default")) for n, m in found.items()})
    assert frozen_grads and not any(frozen_grads)
    for name in found:
        for k in range(1, total):
            before, after = history[k - 1][name], history[k][name]
            frozen = before[2]  # k columns of 4 frozen after step k, all 4 after step 4
            assert torch.equal(after[0][:, frozen], before[0][:, frozen]), (name, k)
            assert not torch.equal(after[1], before[1])  # S keeps training
            if k < 4:  # the live columns still train
                live = [c for c in range(4) if c not in range(4)[frozen]]
                assert not torch.equal(after[0][:, live], before[0][:, live])
        assert torch.equal(history[-1][name][0], history[3][name][0])  # all of P_B as it was when it froze
        assert not torch.equal(history[-1][name][0], start[name])  # P_B did train before freezing
    counts = model.base_model.trainable_counts()
    assert counts["P_B"] == 0 and counts["S"] == 4 * 16
    for layer in found.values():
        assert not layer.lamda_B["default"].requires_grad and layer.lamda_B["default"].grad is None
    model.base_model.set_adapter("default")  # PEFT re-enables adapter weights here; P_B must stay frozen
    assert all(not m.lamda_B["default"].requires_grad and m.lamda_S["default"].requires_grad for m in found.values())


def test_adapter_path_stores_only_r_dimensional_activations():
    model = lamda("llama", r=4)
    perturb(model)
    layer = layers(model)["model.layers.0.self_attn.q_proj"]
    for frozen in (0, 4):  # P_B trainable, then fully frozen
        layer.freeze_columns("default", frozen)
        x = torch.randn(2, 5, 64, requires_grad=True)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = layer.adapter_output("default", x)
        activations = [s for s in shapes if s and torch.Size(s[:-1]).numel() == 10]  # one row per token
        assert activations and all(s[-1] == 4 for s in activations), shapes
        y.sum().backward()
        assert x.grad.abs().sum() > 0  # the adapter path still passes gradient on to earlier layers


def make_spectrum(rows: int, cols: int, sigma: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g))[0]
    s = torch.zeros(rows, cols)
    s[range(len(sigma)), range(len(sigma))] = torch.tensor(sigma)
    return u @ s @ v.T


def test_lamda_plus_plus_ranks_follow_the_spectra_and_sum_to_the_budget():
    model = tiny_llama()
    attn = [layer.self_attn for layer in model.model.layers]
    # energy 0.9 needs k = 58 (flat, 64), 29 (flat, 32), 4 (4 equal values), 1 (one value) singular values
    spectra = [(attn[0].q_proj, [1.0] * 64), (attn[0].v_proj, [1.0] * 32), (attn[1].q_proj, [1.0] * 4),
               (attn[1].v_proj, [1.0])]
    with torch.no_grad():
        for seed, (module, sigma) in enumerate(spectra):
            module.weight.copy_(make_spectrum(*module.weight.shape, sigma, seed))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    ranks = lamda_ranks(model, LamdaConfig(rank_allocation="spectrum"))
    # budget 32 = 4 * 8: c * (58 + 29 + 4) + 1 = 32 -> 19.76, 9.88, 1.36, 1 -> largest remainders 9.88, 19.76
    assert ranks == dict(zip(names, [20, 10, 1, 1]))
    capped = lamda_ranks(model, LamdaConfig(rank_allocation="spectrum", r_max=16))
    assert capped == dict(zip(names, [16, 13, 2, 1]))  # 16 + 1, then 15 for (29, 4): 13.18, 1.82
    assert sum(lamda_ranks(model, LamdaConfig(rank_allocation="spectrum", rank_budget=37)).values()) == 37
    assert lamda_ranks(model, LamdaConfig()) == dict.fromkeys(names, 8)
    with pytest.raises(ValueError, match="rank budget 3 is outside"):
        lamda_ranks(model, LamdaConfig(rank_allocation="spectrum", rank_budget=3))
    with pytest.raises(ValueError, match="needs the model's weights"):
        lamda_ranks(meta_model("llama-2-7b"), LamdaConfig(rank_allocation="spectrum"))
    adapted = get_peft_model(model, LamdaConfig(task_type="CAUSAL_LM", rank_allocation="spectrum", r_max=16))
    assert adapted.peft_config["default"].rank_pattern == capped
    assert {n: m.lamda_S["default"].shape[0] for n, m in layers(adapted).items()} == capped
    assert {n: m.scaling["default"] for n, m in layers(adapted).items()} == {n: 16 / r for n, r in capped.items()}


def test_allocation_is_exact_bounded_and_monotone():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        weights = [rng.randint(1, 300) for _ in range(n)]
        low, high = [rng.randint(1, 3)] * n, [rng.randint(4, 64) for _ in range(n)]
        budget = rng.randint(sum(low), sum(high))
        ranks = allocate(weights, budget, low, high)
        assert sum(ranks) == budget
        assert all(lo <= r <= hi for r, lo, hi in zip(ranks, low, high))
        for i in range(n):
            for j in range(n):
                if weights[i] > weights[j] and high[i] >= high[j]:
                    assert ranks[i] >= ranks[j], (weights, budget, high, ranks)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merge_equals_unmerged_and_unmerge_restores(family, tokens):
    build = FAMILIES[family][0]
    base_model = build()
    weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = get_peft_model(base_model, LamdaConfig(task_type=FAMILIES[family][1])).eval()
    perturb(model)
    adapted = out(model, tokens)
    found = layers(model)
    name, layer = next(iter(found.items()))
    a, b, s = (getattr(layer, f"lamda_{x}")["default"].detach().clone() for x in "ABS")
    model.merge_adapter()
    torch.testing.assert_close(out(model, tokens), adapted, rtol=1e-4, atol=1e-5)
    w0 = weights[name + ".weight"]
    u, sigma, vh = torch.linalg.svd(w0, full_matrices=False)
    residual = w0 - u[:, :8] @ torch.diag(sigma[:8]) @ vh[:8]
    torch.testing.assert_close(layer.base_layer.weight, residual + 2.0 * b @ s @ a, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    for key, module in found.items():
        torch.testing.assert_close(module.base_layer.weight, weights[key + ".weight"], rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert not any("lamda" in n for n, _ in plain.named_modules())
    assert type(plain).__name__ == type(build()).__name__
    torch.testing.assert_close(out(plain, tokens), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,options", [("llama", {}), ("bert", {"lamda_init": "svd_identity"}),
                                            ("llama", {"rank_allocation": "spectrum", "rank_budget": 30})])
def test_save_and_load_gives_the_same_outputs(family, options, tokens, tmp_path):
    model = lamda(family, **options).eval()
    perturb(model)
    expected = out(model, tokens)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LAMDA"
    assert config["rank_pattern"] == model.peft_config["default"].rank_pattern
    if options.get("rank_allocation"):
        assert sum(config["rank_pattern"].values()) == 30 and len(set(config["rank_pattern"].values())) > 1
    loaded = PeftModel.from_pretrained(FAMILIES[family][0](), tmp_path / "adapter").eval()
    assert torch.equal(out(loaded, tokens), expected)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_uses_the_saved_projections_not_a_new_svd(low_cpu_mem_usage, tokens, tmp_path, monkeypatch):
    model = lamda("llama").eval()
    perturb(model)
    expected = out(model, tokens)
    model.save_pretrained(tmp_path)
    real = lamda_layer.svd_start

    def flipped(*args):  # what another machine's SVD may return: the same subspaces, other signs
        a, b, s0 = real(*args)
        return -a, -b, s0

    monkeypatch.setattr(lamda_layer, "svd_start", flipped)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert torch.equal(out(loaded, tokens), expected)
    fresh = get_peft_model(tiny_llama(), LamdaConfig(task_type="CAUSAL_LM"))
    assert not torch.equal(layers(fresh)["model.layers.0.self_attn.q_proj"].lamda_A["default"],
                           layers(model)["model.layers.0.self_attn.q_proj"].lamda_A["default"])  # the patch bites


def test_loading_onto_the_wrong_base_model_is_a_clear_error(tmp_path):
    lamda("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different base model: model_type llama .adapter. vs bert"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_bf16_base_model_keeps_fp32_adapter_maths(tokens):
    base = out(tiny_llama().to(torch.bfloat16), tokens)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LamdaConfig(task_type="CAUSAL_LM"))
    assert torch.equal(out(model, tokens), base)
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "lamda" in n]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in layers(model).values())
    perturb(model)
    assert (out(model, tokens).float() - base.float()).abs().max() > 1e-2


def test_llama2_7b_counts_on_the_meta_device():
    model = get_peft_model(meta_model("llama-2-7b"), LamdaConfig(task_type="CAUSAL_LM", r=64, target_modules=ALL_LLAMA))
    tuner = model.base_model
    assert tuner.trainable_counts() == {"S": 917_504, "P_B": 87_031_808, "other": 0, "total": 87_949_312}
    assert count_parameters(model)["trainable"] == 917_504 + 87_031_808
    assert tuner.update_freezing(1, 10) == 224 * 21  # floor(64 / 3) columns of each of the 224 matrices
    assert tuner.trainable_counts()["P_B"] == 87_031_808 // 64 * 43
    assert tuner.update_freezing(3, 10) == 224 * 64
    assert tuner.trainable_counts() == {"S": 917_504, "P_B": 0, "other": 0, "total": 917_504}
    assert count_parameters(model)["trainable"] == 917_504


@pytest.mark.parametrize("make,match", [
    (lambda: LamdaConfig(r=0), "r must be a positive integer"),
    (lambda: LamdaConfig(lamda_init="pissa"), "lamda_init must be one of"),
    (lambda: LamdaConfig(freeze_fraction=0), "freeze_fraction must be in"),
    (lambda: LamdaConfig(freeze_order="random"), "freeze_order must be one of"),
    (lambda: LamdaConfig(rank_allocation="adaptive"), "rank_allocation must be one of"),
    (lambda: LamdaConfig(r_min=4, r_max=2), "r_max 2 is smaller than r_min 4"),
    (lambda: LamdaConfig(energy_threshold=1.5), "energy_threshold must be in"),
    (lambda: lamda("llama", r=40, target_modules=["v_proj"]), "rank 40 exceeds the size 32 x 64"),
    (lambda: frozen_count(4, 1, 0, 0.3), "total_steps > 0"),
])
def test_bad_input_gets_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
