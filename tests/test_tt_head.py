"""LoRETTA's TT classification head: which layer it replaces, that it works, trains, saves and reloads."""

import json

import pytest
import torch
from conftest import out, perturb, tiny_bert, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    DebertaConfig,
    DebertaForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from leanft import LorettaAdpConfig, LorettaRepConfig
from leanft.tt import TTMatrix
from leanft.tuners.tt_head import TTHead

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 128}


def tiny_roberta() -> torch.nn.Module:
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(**SMALL, max_position_embeddings=40, pad_token_id=1)).eval()


def tiny_deberta() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = DebertaConfig(**SMALL, relative_attention=True, max_relative_positions=-1, pos_att_type=["c2p", "p2c"],
                        position_biased_input=False, type_vocab_size=0)
    return DebertaForSequenceClassification(cfg).eval()


ENCODERS = {"bert": tiny_bert, "roberta": tiny_roberta, "deberta": tiny_deberta}
# the classifier's hidden h x h layer, and the last projection that trains densely
HIDDEN = {"bert": "bert.pooler.dense", "roberta": "classifier.dense", "deberta": "pooler.dense"}
LAST = {"bert": "classifier", "roberta": "classifier.out_proj", "deberta": "classifier"}
# BERT's pooler is the pretrained encoder's and kept unless named (tuners/tt_head.py)
NAMED = {"bert": {"classifier_dense": "bert.pooler.dense"}}


def config(method: str, kind: str = "", **extra):
    extra = {**NAMED.get(kind, {}), **extra}
    if method == "adp":
        return LorettaAdpConfig(task_type="SEQ_CLS", bottleneck_size=16, **extra)
    return LorettaRepConfig(task_type="SEQ_CLS", **extra)


def labels(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(tokens)) % 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("method", ["adp", "rep"])
def test_the_hidden_dense_layer_becomes_a_working_tt_head_and_out_proj_trains_densely(kind, method, tokens):
    base = out(ENCODERS[kind](), tokens)
    model = get_peft_model(ENCODERS[kind](), config(method, kind))
    cfg = model.peft_config["default"]
    assert cfg.classifier_dense == HIDDEN[kind] and LAST[kind] in cfg.modules_to_save
    head = model.base_model.model.get_submodule(HIDDEN[kind])
    assert isinstance(head, TTHead)
    tt = head.heads["default"]
    assert isinstance(tt, TTMatrix) and tt.bias is not None and tt.rank == cfg.tt_rank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_head = [n for n in trainable if f"{HIDDEN[kind]}." in n]
    assert len(in_head) == len(list(tt.parameters())) and all(f"loretta_{method}_head.default." in n for n in in_head)
    assert any(f"{LAST[kind]}.modules_to_save.default.weight" in n for n in trainable)
    assert not head.base_layer.weight.requires_grad  # the original dense layer stays as it was
    # a working head: different inputs give different logits, and every part of it gets a gradient
    logits = out(model, tokens)
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    model.train()(input_ids=tokens, labels=labels(tokens)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tt.parameters())
    # disabling the adapter gives the original model back, the hidden dense layer included
    with model.disable_adapter():
        assert torch.equal(out(model.eval(), tokens), base)


@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("method", ["adp", "rep"])
def test_the_tt_head_saves_and_reloads_with_the_adapter(kind, method, tokens, tmp_path):
    model = get_peft_model(ENCODERS[kind](), config(method, kind)).eval()
    perturb(model)
    expected = out(model, tokens)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(f"{HIDDEN[kind]}.loretta_{method}_head.core_0" in k for k in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["classifier_dense"] == HIDDEN[kind]
    loaded = PeftModel.from_pretrained(ENCODERS[kind](), tmp_path).eval()
    assert isinstance(loaded.base_model.model.get_submodule(HIDDEN[kind]), TTHead)
    assert torch.equal(out(loaded, tokens), expected)


# where the dense hidden layer's trainable copy lives with tt_classifier=False
DENSE_COPY = {"bert": "bert.pooler.dense.modules_to_save.default.weight",
              "roberta": "classifier.modules_to_save.default.dense.weight",
              "deberta": "pooler.dense.modules_to_save.default.weight"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ENCODERS)
def test_tt_classifier_false_trains_the_dense_head_including_debertas_random_pooler(kind, tokens):
    model = get_peft_model(ENCODERS[kind](), config("adp", kind, tt_classifier=False))
    assert not any(isinstance(m, TTHead) for m in model.modules())
    copy = next(p for n, p in model.named_parameters() if n.endswith(DENSE_COPY[kind]))
    assert copy.requires_grad
    model.train()(input_ids=tokens, labels=labels(tokens)).loss.backward()
    assert copy.grad is not None and copy.grad.abs().sum() > 0


def test_a_second_adapter_gets_its_own_head_and_switching_adapters_switches_heads(tokens):
    model = get_peft_model(tiny_roberta(), config("rep")).eval()
    perturb(model)
    first = out(model, tokens)
    model.add_adapter("two", config("rep", target_modules=["query", "value"]))
    assert model.peft_config["two"].modules_to_save[0] == "classifier.out_proj"
    head = model.base_model.model.classifier.dense
    assert sorted(head.heads) == ["default", "two"] and torch.equal(out(model, tokens), first)
    model.set_adapter("two")
    assert all(p.requires_grad for p in head.heads["two"].parameters())
    assert not any(p.requires_grad for p in head.heads["default"].parameters())
    assert not torch.equal(out(model, tokens), first)
    model.set_adapter("default")
    model.delete_adapter("two")
    assert sorted(head.heads) == ["default"] and torch.equal(out(model, tokens), first)


def test_rep_merges_the_tt_head_into_the_dense_layer_and_unmerges_it(tokens):
    model = get_peft_model(tiny_roberta(), config("rep")).eval()
    perturb(model)
    head = model.base_model.model.get_submodule("classifier.dense")
    original = head.base_layer.weight.clone()
    adapted = out(model, tokens)
    model.merge_adapter()
    torch.testing.assert_close(out(model, tokens), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(head.base_layer.weight, original)
    plain = model.merge_and_unload()
    assert type(plain.classifier.dense) is torch.nn.Linear
    torch.testing.assert_close(out(plain, tokens), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["adp", "rep"])
def test_bert_keeps_its_pretrained_pooler_frozen_by_default(method, tokens):
    base = out(tiny_bert(), tokens)
    model = get_peft_model(tiny_bert(), config(method, tt_classifier=False, init_mode="zero_core"))
    for candidate in (model, get_peft_model(tiny_bert(), config(method))):
        assert candidate.peft_config["default"].classifier_dense == ""
        assert not any(isinstance(m, TTHead) for m in candidate.modules())
        assert not any("pooler" in n for n, p in candidate.named_parameters() if p.requires_grad)
    assert torch.equal(out(model, tokens), base)


def test_a_classifier_dense_that_names_no_module_is_a_clear_error():
    with pytest.raises(ValueError, match="classifier_dense 'pooler.dense' names no module"):
        get_peft_model(tiny_bert(), config("rep", classifier_dense="pooler.dense"))


def test_decoders_and_headless_classifiers_get_no_tt_head(tokens):
    causal = get_peft_model(tiny_llama(), LorettaRepConfig(task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    llama_cls = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_key_value_heads=2, pad_token_id=0))
    scored = get_peft_model(llama_cls, LorettaAdpConfig(task_type="SEQ_CLS", bottleneck_size=16))
    for model in (causal, scored):
        assert model.peft_config["default"].classifier_dense == ""
        assert not any(isinstance(m, TTHead) for m in model.modules())
    assert "score" in scored.peft_config["default"].modules_to_save
    assert out(scored, tokens).shape == (2, 2)


def test_an_adapter_saved_before_the_tt_head_existed_reloads_with_its_dense_head(tokens, tmp_path):
    """Its config has neither field: it must load as it was saved (no TT head, classifier kept whole)."""
    model = get_peft_model(tiny_roberta(), config("rep", tt_classifier=False, classifier_dense="")).eval()
    perturb(model)
    expected = out(model, tokens)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["tt_classifier"], saved["classifier_dense"]
    path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    assert not any(isinstance(m, TTHead) for m in loaded.modules())
    assert "classifier" in loaded.peft_config["default"].modules_to_save
    assert torch.equal(out(loaded, tokens), expected)
