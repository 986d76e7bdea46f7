"""LoRETTA's tensorised classification head (sequence classification, both LoRETTA variants).

The papers replace the hidden dense layer of an encoder's classification head (RoBERTa
``classifier.dense``, DeBERTa ``pooler.dense``) by a fresh TT-linear ``h -> h`` with bias at the
adapter's TT rank, and train only the last projection (``out_proj``, DeBERTa's ``classifier``) densely.
Without this the dense ``h x h`` layer is most of what trains (590,592 of RoBERTa-base LoRETTA_adp's
687,938), and on DeBERTa the randomly initialised pooler would stay frozen.

The TT head is a tuner layer around the hidden dense layer: while its adapter is active it *replaces*
that layer's output, it trains and saves with the adapter, disabling or unloading the adapter gives
the original layer back, and merging writes the TT matrix into it.

Only a layer of the task head replaces, one that the ``*ForSequenceClassification`` wrapper adds around the
pretrained encoder and so starts random (RoBERTa, ELECTRA ``classifier.dense``, DeBERTa ``pooler.dense``).
BERT's ``pooler.dense`` belongs to the pretrained encoder (``model.base_model``): it is kept, frozen, as
LoRA keeps it (``classifier_dense="bert.pooler.dense"`` replaces it all the same).

A TT matrix whose leading modes index the input has rank at most its TT rank, so this head is a low-rank
map (rank 5 or 8), and it learns more slowly than a dense layer. MiniLM SST-2 (1000 examples, one epoch)
with LoRETTA_adp: 74.8 with BERT's pooler kept, 74.8 and 75.2 with it trained densely from its weights or
from random ones, 52.0 (one class for all) with it replaced by the TT head, 62.8 after three epochs. On short budgets
``tt_classifier=False`` trains the dense head instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..tt import TTMatrix

# Full-name endings of a classification head's hidden h x h layer, most specific first. (DistilBERT's
# ``pre_classifier`` is left dense: PEFT's ``modules_to_save`` entry ``classifier`` matches it by its ending.)
HIDDEN_DENSE = ("classifier.dense", "pooler.dense")


@dataclass
class TTClassifierFields:
    """Config fields of the TT classification head (mixed into the LoRETTA configs)."""

    tt_classifier: bool = field(
        default=True,
        metadata={"help": "Sequence classification: the classifier's hidden dense layer becomes a TT-linear at "
                          "tt_rank and the last projection trains densely (the papers); False trains both densely"},
    )
    classifier_dense: str | None = field(
        default=None,
        metadata={"help": "The classifier's hidden dense layer: None = found on injection (a square layer of the "
                          "task head outside the pretrained encoder), '' = none, or a module's full name"},
    )


def _square(module: nn.Module) -> bool:
    """A square linear layer, or one that another adapter has already given a TT head."""
    return isinstance(module, TTHead) or isinstance(module, nn.Linear) and module.in_features == module.out_features


def find_classifier_dense(model: nn.Module) -> str:
    """Full name of the square linear layer between the encoder and the last classifier projection, or ''.

    Layers inside the pretrained encoder (``model.base_model``, e.g. BERT's pooler) do not count."""
    base = getattr(model, "base_model", model)
    encoder = {id(m) for m in base.modules()} if base is not model else set()
    modules = {n: m for n, m in model.named_modules() if id(m) not in encoder}
    for ending in HIDDEN_DENSE:
        found = [n for n, m in modules.items() if (n == ending or n.endswith("." + ending)) and _square(m)]
        if len(found) == 1:
            return found[0]
    return ""


def _module_names(model: nn.Module, entry: str) -> list[str]:
    """Modules a ``modules_to_save`` entry selects (PEFT matches full names by their ending)."""
    return [n for n, _ in model.named_modules() if n and n.endswith(entry)]


def _rest_of(model: nn.Module, parent: str, head: str) -> list[str]:
    """The parameterised parts of ``parent`` outside ``head`` (e.g. RoBERTa's ``classifier.out_proj``)."""
    out = []
    for child, module in model.get_submodule(parent).named_children():
        full = f"{parent}.{child}"
        if head.startswith(full + "."):
            out += _rest_of(model, full, head)
        elif full != head and any(True for _ in module.parameters()):
            out.append(full)
    return out


def fit_modules_to_save(model: nn.Module, config: Any) -> None:
    """Resolve ``config.classifier_dense`` once and make ``modules_to_save`` agree with the head choice.

    TT head: an entry covering the hidden layer (PEFT adds ``classifier``, which on RoBERTa holds
    ``dense`` and ``out_proj``) is replaced by the rest of that module. Dense head: the hidden layer joins
    ``modules_to_save`` unless an entry covers it already (DeBERTa's pooler is outside ``classifier``).
    An adapter saved before the field existed (fingerprint set, field missing) keeps the dense head.
    """
    if not hasattr(config, "tt_classifier"):
        return
    if config.classifier_dense is None:
        legacy = config.base_model_fingerprint is not None
        seq_cls = str(config.task_type) == "SEQ_CLS"
        config.classifier_dense = find_classifier_dense(model) if seq_cls and not legacy else ""
    head = config.classifier_dense
    if not head:
        return
    if head not in dict(model.named_modules()):
        raise ValueError(f"classifier_dense {head!r} names no module of this model")
    entries = list(config.modules_to_save or [])
    selected = {e: _module_names(model, e) for e in entries}
    covers = {e: any(head == n or head.startswith(n + ".") for n in names) for e, names in selected.items()}
    if not config.tt_classifier:
        if not any(covers.values()):
            config.modules_to_save = [*entries, head]
        return
    kept: list[str] = []
    for entry in entries:
        if not covers[entry]:
            kept.append(entry)
            continue
        for name in selected[entry]:  # by full name: the head's surroundings, and whatever else it selected
            if head.startswith(name + "."):
                kept += _rest_of(model, name, head)
            elif name != head:
                kept.append(name)
    config.modules_to_save = list(dict.fromkeys(kept))


class TTHead(nn.Module, BaseTunerLayer):
    """A TT-linear ``h -> h`` with bias that replaces a classifier's hidden dense layer while active.

    Starts as the reference does (TT cores ``N(0, 1)``-scaled to a Glorot-like std, bias ``U(+-1/sqrt h)``):
    a working random layer, like the dense one it replaces, not a zero map (the head has no pretrained
    function to preserve on RoBERTa and DeBERTa, whose hidden layer is new).
    Subclasses set ``adapter_layer_names`` to ``(<method prefix> + "head",)``.
    """

    adapter_layer_names: tuple[str, ...] = ("tt_head",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: Any, name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear) or base_layer.in_features != base_layer.out_features:
            raise ValueError(f"the TT classifier head replaces a square torch.nn.Linear; {name} is {base_layer}")
        self.base_layer = base_layer
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None  # the base weights while merged
        self.update_layer(adapter_name, config)

    @property
    def heads(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config: Any, **_: Any) -> None:
        base = self.get_base_layer()
        h = base.in_features
        shape = (config.tt_shapes or {}).get(f"{h}x{h}")  # an explicit shape, keyed as every TT matrix's
        self.heads[adapter_name] = TTMatrix(h, h, config.tt_rank, shape, bias=True, device=base.weight.device)
        self.set_adapter(self.active_adapters)

    def _active_head(self) -> str | None:
        return next((n for n in self.active_adapters if n in self.heads), None)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.heads]
        if not names:
            return
        if len(names) > 1 or self.merged:
            raise ValueError("a TT classifier head replaces its dense layer: merge one adapter at a time")
        base, head = self.get_base_layer(), self.heads[names[0]]
        if base.bias is None:
            raise ValueError("cannot merge a TT classifier head into a dense layer without bias")
        weight = head.to_dense().T
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapter {names[0]!r} gives non-finite weights; the adapter is broken")
        self._dense = (base.weight.data.clone(), base.bias.data.clone())
        base.weight.data = weight.to(base.weight.dtype)
        base.bias.data = head.bias.detach().to(base.bias.dtype).clone()
        self.merged_adapters.append(names[0])

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self._dense is None:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        base = self.get_base_layer()
        base.weight.data, base.bias.data = self._dense
        self._dense = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        name = self._active_head()
        if self.disable_adapters or self.merged or name is None:
            return self.base_layer(x, *args, **kwargs)
        return self.heads[name](x)

    def __repr__(self) -> str:
        return "tt_head." + super().__repr__()
