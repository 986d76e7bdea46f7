"""A user's GGUF file as --model: converted once to a plain float checkpoint in the cache, then used like
any local model. The file here is a tiny LLaMA written with the ``gguf`` package, as llama.cpp writes one."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from leanft import cli, convert, models

LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rope_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp keeps q and k rows in the interleaved rotary order; transformers undoes this on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path) -> LlamaForCausalLM:
    """A 2-layer LLaMA with the tiny BPE tokenizer as an F32 GGUF file at ``path``; returns the model."""
    import gguf

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokenizer))
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for i in range(2):
        for hf, name in LAYER_TENSORS.items():
            w = weights[f"model.layers.{i}.{hf}.weight"]
            w = _rope_order(w, 4) if name == "attn_q" else _rope_order(w, 2) if name == "attn_k" else w
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def gguf_model(tmp_path, monkeypatch):
    """(path of a tiny GGUF file, the model it holds), with the conversion cache in tmp_path."""
    monkeypatch.setenv("LEANFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return str(path), write_tiny_gguf(path)


def test_a_gguf_file_is_converted_once_and_loads_as_a_plain_model(gguf_model, monkeypatch):
    path, original = gguf_model
    assert models.model_kind(path) == "causal" and models.task_type(path) == "CAUSAL_LM"
    model, tokenizer = models.load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(torch.equal(p, original.state_dict()[k]) for k, p in model.state_dict().items())
    assert tokenizer("It was great").input_ids == tiny_tokenizer()("It was great").input_ids
    folders = list((models.cache_dir() / "gguf").iterdir())
    assert [f.name.startswith("tiny-llama.F32-") for f in folders] == [True]
    assert {p.name for p in folders[0].iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    monkeypatch.setattr(convert, "convert", lambda *a: pytest.fail("converted a second time"))
    models.load_model(path)  # from the cache
    os.utime(path, ns=(1, 1))  # the file changed: a fresh conversion
    with pytest.raises(pytest.fail.Exception, match="second time"):
        models.load_model(path)


def test_a_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nothing\.gguf does not exist"):
        models.load_model(str(tmp_path / "nothing.gguf"))


@pytest.mark.slow
def test_train_on_a_gguf_file_through_the_cli(gguf_model, tmp_path, capsys):
    path, _ = gguf_model
    out = tmp_path / "run"
    cli.main(["train", "--model", path, "--method", "lora", "--num-train", "8", "--num-dev", "0", "--num-eval", "4",
              "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--output-dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["model"] == path
    assert "trainable parameters" in capsys.readouterr().out


def test_a_truncated_gguf_file_is_named_as_such(gguf_model, tmp_path):
    """Cut inside the fixed header, the metadata, the tensor infos and the tensor data, and by one byte: one line
    saying the file is truncated, from `params` (config only) and `train` alike, instead of a struct.error or
    numpy reshape traceback."""
    import gguf

    path, _ = gguf_model
    data = open(path, "rb").read()
    start = int(gguf.GGUFReader(path).data_offset)  # where the tensor data begins
    for cut in (10, 200, start - 40, start + 100, len(data) - 1):
        short = tmp_path / f"cut-{cut}.gguf"
        short.write_bytes(data[:cut])
        for command in (["params", "--method", "lora"], ["train", "--output-dir", str(tmp_path / "run")]):
            with pytest.raises(SystemExit, match=rf"^leanft: error: .*cut-{cut}.gguf is truncated or not a GGUF "
                                                 r"file \((its header runs past|tensor '.*' ends at byte)"):
                cli.main([command[0], "--model", str(short), *command[1:]])
    (tmp_path / "text.gguf").write_text("not a model\n")
    with pytest.raises(ValueError, match=r"text.gguf is truncated or not a GGUF file \(it does not start with"):
        models.meta_model(str(tmp_path / "text.gguf"))


def test_params_on_a_gguf_file_reads_its_metadata_once_and_names_the_targets(gguf_model, monkeypatch, capsys):
    """transformers decodes the whole vocabulary to get a GGUF file's config (seconds on a real model): once."""
    path, _ = gguf_model
    calls = []
    read = convert.AutoConfig.from_pretrained
    monkeypatch.setattr(convert.AutoConfig, "from_pretrained", lambda *a, **k: calls.append(a) or read(*a, **k))
    cli.main(["params", "--model", path, "--method", "lora,loretta-rep"])
    assert len(calls) == 1
    assert "q_proj, v_proj in 2 layers (4 modules)" in capsys.readouterr().out
