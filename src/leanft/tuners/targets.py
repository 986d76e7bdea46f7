"""Default target modules from a model's own module names, so that any architecture gets them (a table
by ``model_type`` fails on every family it does not list, and on renamed or fine-tuned variants).

Names are leaf names of linear layers, matched as PEFT matches a list: a module whose full name is the
name or ends in ``"." + name``.
"""

from __future__ import annotations

import re

from torch import nn

# LoRA, LoRETTA_rep and LaMDA: the attention query and value projections (LoRA's placement), as separate
# layers, else a fused query/key/value projection adapted whole.
QUERY_VALUE = (("q_proj", "v_proj"), ("query", "value"), ("query_proj", "value_proj"), ("q_lin", "v_lin"),
               ("wq", "wv"), ("to_q", "to_v"), ("q", "v"))
FUSED_QKV = ("qkv_proj", "query_key_value", "Wqkv", "W_pack", "in_proj", "c_attn", "qkv")

# LoRETTA_adp on a gated MLP: input adapters before gate and up, an output adapter after down (LLaMA-likes;
# Phi-3 fuses gate and up).
GATED_MLP = ((("gate_proj", "up_proj"), "down_proj"), (("gate_up_proj",), "down_proj"), (("w1", "w3"), "w2"))
# Else output adapters after the attention output and the feed-forward output (BERT-likes: both are
# ``*.output.dense``; OPT, DistilBERT, GPT-NeoX/Falcon, Phi-1/2 name them so).
BERT_OUTPUT = r".*\.output\.dense"
ATTENTION_FFN_OUTPUT = (("out_proj", "fc2"), ("out_lin", "lin2"), ("dense", "dense_4h_to_h"), ("dense", "fc2"))


def _is_linear(module: nn.Module, conv1d: bool) -> bool:
    return isinstance(module, nn.Linear) or (conv1d and type(module).__name__ == "Conv1D")


def linear_modules(model: nn.Module, conv1d: bool = False) -> list[str]:
    """Full names of the linear layers (transformers' ``Conv1D`` too with ``conv1d``, which LoRA adapts)."""
    return [name for name, m in model.named_modules() if name and _is_linear(m, conv1d)]


def linear_names(model: nn.Module, conv1d: bool = False) -> list[str]:
    """Sorted leaf names of the linear layers: what a user can pass as target modules."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model, conv1d)})


def _matches(full_names: list[str], target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n in full_names)


def _no_default(model: nn.Module, method: str, what: str, conv1d: bool = False) -> ValueError:
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return ValueError(f"{method} finds no {what} among the linear layers of this {kind} model to adapt by "
                      f"default; pass target_modules (--target-modules) from its linear layer names: "
                      f"{linear_names(model, conv1d)}")


def attention_targets(model: nn.Module, method: str, conv1d: bool = False) -> list[str]:
    """The query and value projections of ``model`` (LoRA, LoRETTA_rep and LaMDA's default)."""
    full = linear_modules(model, conv1d)
    for pair in QUERY_VALUE:
        if all(_matches(full, name) for name in pair):
            return list(pair)
    for name in FUSED_QKV:
        if _matches(full, name):
            return [name]
    raise _no_default(model, method, "attention query/value projections", conv1d)


def adapter_targets(model: nn.Module, method: str = "LoRETTA_adp") -> tuple[list[str] | str, list[str]]:
    """LoRETTA_adp's default ``(target_modules, input_modules)`` for ``model`` (see ``GATED_MLP``)."""
    full = linear_modules(model)
    for inputs, output in GATED_MLP:
        if all(_matches(full, name) for name in (*inputs, output)):
            return [*inputs, output], list(inputs)
    if any(n.endswith("output.dense") for n in full):
        return BERT_OUTPUT, []
    for pair in ATTENTION_FFN_OUTPUT:
        if all(_matches(full, name) for name in pair):
            return list(pair), []
    raise _no_default(model, method, "MLP (gate/up/down) or attention-output and feed-forward-output layers")


def check_targets(model: nn.Module, targets: list[str] | str | None, method: str, conv1d: bool = False) -> None:
    """Every name the user listed must name a module of ``model`` (PEFT drops the ones that match nothing
    as long as one matches); a regex must match some module."""
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not _matches(names, t)]
    if missing:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"{method}: target module(s) {missing} match no module of this {kind} model; its "
                         f"linear layers are named {linear_names(model, conv1d)}")
