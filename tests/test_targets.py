"""Default target modules from a model's own module names, for every method and any architecture, and
user-given target modules checked name by name (--target-modules)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_opt
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from leanft import cli, methods

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def renamed_llama():
    """A LLaMA whose model_type no table knows (a fine-tune or a new family built on the same code)."""
    model = tiny_llama()
    model.config.model_type = "mystery-llama"
    return model


def tiny_qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()


def tiny_phi3():  # fused qkv_proj and gate_up_proj
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**SMALL)).eval()


QV, GATED = {"q_proj", "v_proj"}, {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}
# family: (model, attention targets of LoRA / LoRETTA_rep / LaMDA, LoRETTA_adp placements)
FAMILIES = {
    "renamed-llama": (renamed_llama, QV, GATED),
    "qwen2": (tiny_qwen2, QV, GATED),
    "phi3": (tiny_phi3, {"qkv_proj"}, {"gate_up_proj": "input", "down_proj": "output"}),
    "opt": (tiny_opt, QV, {"out_proj": "output", "fc2": "output"}),
}
OPTIONS = {"loretta-adp": {"bottleneck": 16}, "loretta-rep": {"tt_rank": 2}}


def adapted(model) -> dict[str, set[str]]:
    """Leaf name -> full names of the layers an adapter wraps."""
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            found.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    return found


def one_step(model) -> None:
    """One AdamW step on a language-modelling loss moves the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.AdamW(trainable, lr=1e-2).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "loretta-rep", "lamda", "lamda++", "loretta-adp"])
def test_every_method_finds_default_targets_by_module_name_and_trains(family, method):
    make, attention, placements = FAMILIES[family]
    model = methods.apply_method(make(), method, "CAUSAL_LM", **OPTIONS.get(method, {}))
    layers = adapted(model)
    expected = set(placements) if method == "loretta-adp" else attention
    assert set(layers) == expected
    assert all(len(names) == 2 for names in layers.values())  # every layer of the 2-layer model
    if method == "loretta-adp":
        for leaf, names in layers.items():
            assert {model.get_submodule(n).placement["default"] for n in names} == {placements[leaf]}
    one_step(model)


def test_gpt2_lora_targets_its_fused_conv1d_attention():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=16))
    model = methods.apply_method(gpt2, "lora", "CAUSAL_LM")
    assert set(adapted(model)) == {"c_attn"}
    one_step(model)


@pytest.mark.parametrize("method,what", [("loretta-rep", "attention query/value projections"),
                                         ("loretta-adp", "MLP")])
def test_no_recognisable_module_is_a_clear_error_listing_the_linear_layers(method, what):
    """GPT-2's layers are Conv1D, which LoRETTA does not adapt: nothing to default to."""
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match=rf"finds no {what}.* this gpt2 model .*--target-modules.*\['lm_head'\]"):
        methods.apply_method(gpt2, method, "CAUSAL_LM", **OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", ["lora", "loretta-rep", "loretta-adp", "lamda"])
def test_given_target_modules_are_used_and_an_unknown_one_is_named(method):
    options = {**OPTIONS.get(method, {}), "target_modules": ["k_proj", "o_proj"]}
    assert set(adapted(methods.apply_method(tiny_llama(), method, "CAUSAL_LM", **options))) == {"k_proj", "o_proj"}
    options["target_modules"] = ["k_proj", "kk_proj"]
    with pytest.raises(ValueError, match=r"\['kk_proj'\] match no module of this llama model; its linear layers "
                                         r"are named \[.*'k_proj'"):
        methods.apply_method(tiny_llama(), method, "CAUSAL_LM", **options)


@pytest.mark.parametrize("method", ["lora", "loretta-rep"])
def test_all_linear_shorthand(method):
    model = methods.apply_method(tiny_llama(), method, "CAUSAL_LM", target_modules=["all-linear"])
    assert set(adapted(model)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_target_modules_flag_reaches_the_method_options():
    args = cli.build_parser().parse_args(["train", "--target-modules", "q_proj, k_proj,"])
    assert cli.train_config(args).method_options["target_modules"] == ["q_proj", "k_proj"]


def test_unknown_target_module_on_the_command_line_is_a_clear_error(tiny_llama_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"leanft: error: .*\['nope'\] match no module .*'q_proj'"):
        cli.main(["train", "--model", tiny_llama_dir, "--method", "lora", "--target-modules", "q_proj,nope",
                  "--num-train", "8", "--num-dev", "0", "--num-eval", "4", "--max-steps", "1",
                  "--output-dir", str(tmp_path)])


# ---- which modules a method adapted, in a few words -----------------------------------------------

@pytest.mark.slow
def test_params_and_train_say_which_modules_they_target(tiny_llama_dir, tmp_path, capsys):
    cli.main(["params", "--model", tiny_llama_dir, "--method", "full,lora,loretta-adp", "--bottleneck", "8"])
    text = capsys.readouterr().out
    assert "every weight (full fine-tuning)" in text and "q_proj, v_proj in 2 layers (4 modules)" in text
    assert "gate_proj, up_proj, down_proj in 2 layers (6 modules)" in text
    cli.main(["params", "--model", "roberta-base", "--method", "loretta-rep", "--json"])
    assert "loretta-rep adapts query, value in 12 layers; classifier.dense (25 modules)" in capsys.readouterr().err
    cli.main(["train", "--model", tiny_llama_dir, "--method", "lora", "--target-modules", "q_proj,o_proj",
              "--num-train", "8", "--num-dev", "0", "--num-eval", "4", "--max-steps", "1", "--no-eval-before",
              "--output-dir", str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[:3]
    assert any(line.startswith("lora adapts q_proj, o_proj in 2 layers (4 modules): ") for line in first), first
