"""GGUF files made plain: transformers reads a GGUF checkpoint, but flags the model as quantized
(``config.quantization_config``, ``hf_quantizer``), which blocks training and ``save_pretrained``.

``convert`` rebuilds such a model as an ordinary float32 one and saves it (safetensors, config, tokenizer)
once, atomically; ``models`` decides where (the cache) and when (the folder is missing).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

CHECK_TEXT = "The quick brown fox jumps over"


def is_gguf(name: str | os.PathLike) -> bool:
    """A model name that is a GGUF file (by its suffix; whether it exists is checked on use)."""
    return str(name).lower().endswith(".gguf")


def gguf_file(name: str | os.PathLike) -> Path:
    """The GGUF file of a model name, which must exist (a clear error instead of transformers' own)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {name} does not exist")
    return path.resolve()


def cache_key(path: Path) -> str:
    """Folder name of a GGUF file's conversion: its name, and a digest of name, size and modification time,
    so a file replaced in place gets a fresh conversion while a moved one (same mtime) reuses the cache."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def gguf_config(path: Path) -> PretrainedConfig:
    """The transformers config a GGUF file's metadata describes (no tensors are read)."""
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf(path: Path) -> tuple[PreTrainedModel, object]:
    """A GGUF file as transformers loads it: weights dequantized to float32, model flagged as quantized."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same model without the quantization flags, sharing the dequantized tensors (no second copy in
    memory: a 7B model is 28 GB in float32)."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    for name, buffer in gguf_model.named_buffers():  # non-persistent ones (rotary frequencies) too
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer
    plain.tie_weights()
    left = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"rebuilding the GGUF model left tensors without values: {left[:5]}")
    return plain.eval()


def convert(load: Callable[[], tuple[PreTrainedModel, object]], target: Path, label: str) -> None:
    """Rebuild the model ``load()`` gives as a plain float32 model and save it, with its tokenizer, at
    ``target``. Written to a temp folder beside ``target`` and renamed in one step, so an interrupted
    conversion never leaves a half-written cache.
    """
    gguf_model, tokenizer = load()
    plain = plain_copy(gguf_model)
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(plain(ids).logits, gguf_model(ids).logits):
            raise RuntimeError(f"{label}: rebuilt model logits differ from the GGUF model")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"  # mkdir honours umask, mkdtemp would not
    try:
        tmp.mkdir()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic; fails if another process won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
