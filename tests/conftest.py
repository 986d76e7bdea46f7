"""Tiny randomly initialised models of three families (LLaMA, BERT, OPT) for fast CPU tests."""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

import leanft  # noqa: F401  (registers the tuners with PEFT)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_opt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    word_embed_proj_dim=64, max_position_embeddings=64)
    return OPTForCausalLM(cfg).eval()


def _child(fn, args: tuple, out: str, err: str | None, threads: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    stdout = os.open(out, flags)
    os.dup2(stdout, 1)
    os.dup2(stdout if err is None else os.open(err, flags), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(threads)
    fn(*args)


_SERVER: list = []


def forked(fn, *args, out: Path, err: Path | None = None) -> int:
    """``fn(*args)`` (a module-level function) in a child process forked from a server that imported torch,
    transformers and leanft once (a fresh interpreter spends seconds on them; a fork of a process that has
    computed is unsafe, its thread pools are not forked with it), with this process's thread count: its exit
    status (negative: the signal that killed it), its stdout in ``out`` and its stderr in ``err`` (or ``out``).
    For children whose point is a process of their own (a kill, a signal, a peak of memory), not a fresh import."""
    if not _SERVER:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["conftest", "fault_driver", "leanft.cli"])
        _SERVER.append(context)
    process = _SERVER[0].Process(target=_child, args=(fn, args, str(out), err and str(err), torch.get_num_threads()))
    process.start()
    process.join(900)
    return process.exitcode


def reloaded(engine, fresh):
    """``fresh`` given ``engine``'s trainable tensors and ``state_dict``, through bytes as a checkpoint keeps them."""
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in engine.params], "state": engine.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    with torch.no_grad():
        for p, s in zip(fresh.params, saved["params"]):
            p.copy_(s)
    fresh.load_state_dict(saved["state"])
    return fresh


def free_port() -> str:
    """A TCP port no one listens on now, for a torchrun test (tests may run side by side under xdist)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


FAMILIES = {"llama": (tiny_llama, "CAUSAL_LM"), "bert": (tiny_bert, "SEQ_CLS"), "opt": (tiny_opt, "CAUSAL_LM")}


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable tensor so the adapter is no longer at its start."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))


def out(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in a second on a few sentences: no hub, never an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["It was great. It was terrible. Yes or No? Does this mean that the movie is good?",
              "Suppose the premise. Can we infer that? Yes, No, or Maybe? a film with a story"] * 50
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_model_dir(path, family: str = "llama", **sizes) -> str:
    """Save a tiny random model of ``family`` with the tiny tokenizer, loadable by name (its folder);
    ``sizes`` override the LLaMA config (another width or depth: a model an adapter does not fit)."""
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2), **sizes},
                                             vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    else:
        model = BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, vocab_size=vocab, pad_token_id=0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    return make_model_dir(tmp_path_factory.mktemp("tiny-bert"), "bert")
