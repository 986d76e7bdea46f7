"""GGUF files made plain: transformers reads a GGUF checkpoint, but flags the model as quantized
(``config.quantization_config``, ``hf_quantizer``), which blocks training and ``save_pretrained``.

``convert`` rebuilds such a model as an ordinary float32 one and saves it (safetensors, config, tokenizer)
once, atomically; ``models`` decides where (the cache) and when (the folder is missing).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import mmap
import os
import shutil
import struct
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
    """The GGUF file of a model name, which must exist and be whole (a clear error instead of transformers' own)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {name} does not exist")
    check_gguf(path)
    return path.resolve()


# struct formats of GGUF's scalar metadata value types, by type number (GGUF spec)
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header in place; values it does not need (arrays: the tokenizer's vocabulary) are skipped."""

    def __init__(self, data) -> None:
        self.data, self.pos, self.order = data, 4, "<"

    def take(self, fmt: str):
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.data):
            raise struct.error("past the end")

    def string(self) -> bytes:
        n = self.take("Q")
        start = self.pos
        self.skip(n)
        return bytes(self.data[start:self.pos])

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in SCALAR_FORMATS:
                self.skip(count * struct.calcsize(SCALAR_FORMATS[item]))
            else:
                for _ in range(count):
                    self.value(item)
            return None
        if kind not in SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {kind} at byte {self.pos}")
        return self.take(SCALAR_FORMATS[kind])


def tensor_data_end(data) -> tuple[int, str]:
    """Where the tensor data a GGUF header declares ends, and the tensor that ends there."""
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    if bytes(data[:4]) != b"GGUF":
        raise ValueError("it does not start with the GGUF magic number")
    cursor = _Cursor(data)
    if cursor.take("I") & 0xFFFF == 0:  # the version reads byte-swapped: a big-endian file
        cursor.order = ">"
    n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cursor.string()
        value = cursor.value(cursor.take("I"))
        if key == b"general.alignment":
            alignment = value
    ends = [(0, "")]
    for _ in range(n_tensors):
        name = cursor.string().decode(errors="replace")
        dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
        kind, offset = cursor.take("I"), cursor.take("Q")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        ends.append((offset + math.prod(dims) // block * size, name))
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"its header gives an alignment of {alignment!r}")
    start = -(-cursor.pos // alignment) * alignment  # tensor data begins at the next aligned byte
    end, name = max(ends)
    return start + end, name


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file cut short (an interrupted download or copy) or no GGUF file at all, by comparing the
    tensor data its header declares with the file's size: transformers would fail with a struct or reshape
    error that says neither. Reads the header only (the vocabulary's strings are skipped, not decoded), once
    per file version."""
    stat = path.stat()
    reason = _gguf_problem(path, stat.st_size, stat.st_mtime_ns)
    if reason:
        raise ValueError(f"{path} is truncated or not a GGUF file ({reason})")


@functools.lru_cache(maxsize=8)
def _gguf_problem(path: Path, size: int, mtime_ns: int) -> str | None:
    if not size:
        return "it is empty"
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end, name = tensor_data_end(data)
    except struct.error:
        return f"its header runs past the end of the file, at {size:,} bytes"
    except ValueError as e:
        return str(e)
    return f"tensor {name!r} ends at byte {end:,}, the file has {size:,}" if end > size else None


def cache_key(path: Path) -> str:
    """Folder name of a GGUF file's conversion: its name, and a digest of name, size and modification time,
    so a file replaced in place gets a fresh conversion while a moved one (same mtime) reuses the cache."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def gguf_config(path: Path) -> PretrainedConfig:
    """The transformers config a GGUF file's metadata describes (no tensors are read); a copy of the one read
    first for this file version, since transformers decodes the whole vocabulary to get it (seconds)."""
    stat = path.stat()
    return copy.deepcopy(_read_gguf_config(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_gguf_config(path: Path, size: int, mtime_ns: int) -> PretrainedConfig:
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
