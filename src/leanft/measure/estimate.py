"""Training-memory estimate of a method on a model, from its architecture alone (no weights).

``estimate`` splits the peak memory of a training step into weights, gradients, optimiser state and
activations (everything else the step holds at its peak). It is an estimate, built this way:

* Weights, gradients and optimiser state are counted from the adapted model's own tensors, in their real
  dtypes: the base model in ``dtype``, leanft's adapters in fp32. Gradients have their parameter's dtype.
  AdamW (torch's, as leanft uses it) keeps two states shaped and typed like each trainable parameter; its
  update briefly holds one more copy of all of them on CUDA (the foreach path) and two of the largest
  tensor on CPU (the per-tensor path).
* Activations come from simulating one step on the meta device: forward (causal-LM loss over the whole
  sequence for decoders, 2-label classification for encoders) and backward of ``batch_size`` sequences of
  ``seq_len`` tokens, under ``LiveBytes``, a dispatch mode that adds up the storages the step's operations
  create and takes them off when they are freed. Its peak is the largest working set of forward plus
  backward, gradients included as they appear. On real CPU tensors the whole estimate agrees with the CPU
  allocator's own peak within 0.1% in float32 (``tests/test_estimate.py``); scratch memory inside kernels
  (a few bfloat16 backward kernels use some) is not seen.
* The step is a steady-state one (the second and later): AdamW's state already exists during forward and
  backward, so ``total = weights + optimizer + max(peak of forward/backward, gradients + update temporaries)``.
* Zeroth-order methods (``methods.ZO_METHODS``) run forwards only, in eval mode and without autograd, so
  the activations are the largest transient working set of one forward; there are no gradients. Their
  "optimizer" memory is what ``zo.ZOEngine`` keeps: with at most ``copy_limit`` trainable elements two
  copies of them (the perturbation snapshot and the last good state), else nothing; perturbing or updating
  a tensor holds a few fp32 temporaries of its size, and the update an fp32 accumulator of all of them.
* Attention: on the meta device torch always takes the math path of ``scaled_dot_product_attention``
  (full S x S scores); real devices take a fused kernel when they can, which keeps O(S) per head.
  ``FusedAttention`` sends meta calls to the fused kernel's meta version when the target ``device`` would
  use one: on CUDA always (flash or memory-efficient), on CPU when torch's own CPU choice says so (not with
  attention dropout in training, for instance). Models with their own attention (DeBERTa) are as they are.

Not modelled: padding and attention masks (the sequences are full), activation checkpointing, the
allocator's caching and fragmentation, the CUDA context and library workspaces, LaMDA after P_B is frozen
(the estimate is of the phase where P_B trains), LaMDA++ on meta models (its ranks come from the weights'
spectra; it has LaMDA's total rank). ``estimate_check`` measures real steps to state the error.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..methods import ZO_METHODS, apply_method, count_parameters, resolve_method
from ..models import meta_model, model_kind
from ..zo import CHUNK, ZOEngine

MB = 2**20
ZO_COPY_LIMIT: int = inspect.signature(ZOEngine).parameters["copy_limit"].default
PAPER_MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "roberta-large", "deberta-base")
# lamda++ is left out: on meta models it has no weights to allocate ranks from (its total rank is lamda's)
PAPER_METHODS = ("full", "lora", "loretta-rep", "loretta-adp", "lamda", "mezo", "mezo-lora", "adazeta")
PAPER_SHAPES = {"causal": (1, 512), "encoder": (16, 128)}  # (batch, tokens) per sequence


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive (``now``) and their peak.

    A storage is counted once however many views share it. One first met as an operation's input existed
    before (weights, inputs) and never counts. Frees are seen by a finalizer on the storage, whose Python
    object torch keeps alive exactly as long as the storage itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.before: dict[int, torch.UntypedStorage] = {}  # held, so their addresses are never reused
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                self.before.setdefault(t.untyped_storage()._cdata, t.untyped_storage())
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 0  # .item() of a meta tensor: only "is there a pad token?" checks ask; our ids have none
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.before:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.now)
        return out


def _fused_on(device: str, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False) -> bool:
    """Whether ``device`` runs this attention with a fused kernel. On CPU torch decides, asked with
    one-token tensors of the same heads, dtype and options (its choice depends on neither batch nor length)."""
    if device != "cpu":
        return True
    small = lambda t: torch.empty(1, t.shape[-3], 1, t.shape[-1], dtype=t.dtype, requires_grad=t.requires_grad)
    mask = None if attn_mask is None else torch.empty([1] * attn_mask.dim(), dtype=attn_mask.dtype)
    choice = torch._fused_sdp_choice(small(q), small(k), small(v), mask, dropout_p, is_causal, scale=scale,
                                     enable_gqa=enable_gqa)
    return choice != torch.nn.attention.SDPBackend.MATH.value


class FusedAttention(TorchFunctionMode):
    """Meta ``scaled_dot_product_attention`` as ``device`` would run it: the fused kernel's meta version
    (output and a log-sum-exp per row saved for backward) wherever the device would fuse."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        meta = func is F.scaled_dot_product_attention and args and args[0].is_meta
        if meta and _fused_on(self.device, *args, **kwargs):
            return _flash(*args, **kwargs)
        return func(*args, **kwargs)


def _flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The fused attention kernel with an autograd formula on meta tensors (it takes grouped K/V as is)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def step_loss(model: nn.Module, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Training loss on ``ids``: next-token cross-entropy over the sequence (decoders) or class 0 of the
    classification head (encoders). Computed here so no model inspects its labels' values."""
    logits = model(input_ids=ids).logits.float()
    if causal:
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)  # the last token predicts nothing
    else:
        targets = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the tensors' elements (what each would take on its own)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each storage once (tied embeddings share one)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def _zo_memory(trainable: list[nn.Parameter]) -> tuple[int, int]:
    """(held, transient) bytes of ``zo.ZOEngine`` beyond the model and its forward.

    Low-precision trainable sets (full-model MeZO on a bfloat16 model): one rollback copy up to the copy
    limit, and the update's temporaries of one chunk; the perturbed copies live inside the forward
    (``_forward_backward_peak``).

    Up to the copy limit: two copies of the trainable set; perturbing one tensor of n elements holds z,
    eps z and their sum in fp32 (plus the snapshot in fp32 if the tensor is not); the update holds an fp32
    accumulator of all of them, the last tensor's z (still bound after the accumulation loop), lr a and the
    result (plus the parameter in fp32). Above it, parameters are perturbed in place: z and eps z in fp32,
    and eps z cast to the parameter's dtype.
    """
    def fp32(p: nn.Parameter) -> int:
        return 4 * p.numel()

    def unless_fp32(p: nn.Parameter, size: int) -> int:
        return 0 if p.dtype == torch.float32 else size

    if any(p.dtype != torch.float32 for p in trainable):  # low precision: stochastic rounding, no snapshot
        held = _bytes(trainable) if sum(p.numel() for p in trainable) <= ZO_COPY_LIMIT else 0
        update = _rounding_bytes_per_element(trainable[0].dtype)[1]
        return held, int(max(update * min(p.numel(), CHUNK) for p in trainable))
    if sum(p.numel() for p in trainable) > ZO_COPY_LIMIT:
        return 0, max(2 * fp32(p) + unless_fp32(p, p.numel() * p.element_size()) for p in trainable)
    perturb = max(3 * fp32(p) + unless_fp32(p, fp32(p)) for p in trainable)
    update = (sum(map(fp32, trainable)) + fp32(trainable[-1])
              + max(2 * fp32(p) + unless_fp32(p, fp32(p)) for p in trainable))
    return 2 * _bytes(trainable), max(perturb, update)


@functools.cache
def _rounding_bytes_per_element(dtype: torch.dtype) -> tuple[float, float]:
    """Temporary bytes per element of one chunk while ``zo.ZOEngine`` rounds a low-precision perturbation
    (beyond the perturbed copy itself) and an update: counted on a real tensor of one chunk's length."""
    n = 4096
    module = nn.Linear(n, 1, bias=False).to(dtype)
    engine = ZOEngine(module, eps=1e-3, copy_limit=0)
    with LiveBytes() as live:
        engine._rounded(0, 0, 1.0)
    perturb = (live.peak - n * module.weight.element_size()) / n
    with LiveBytes() as live:
        engine.apply([0], [1.0], 1e-3)
    return perturb, live.peak / n


def _forward_backward_peak(model: nn.Module, ids: torch.Tensor, causal: bool, first_order: bool,
                           device: str, rounding: float = 0.0) -> int:
    """Peak bytes created by one forward (and backward, for first-order methods), weights excluded.

    ``rounding`` > 0 (low-precision zeroth-order steps): during each module's forward its trainable weights
    have a perturbed copy, made with ``rounding`` temporary bytes per element of one chunk, as ``zo`` does.
    """
    model.train(first_order)  # zeroth-order steps run in eval mode (zo.py)
    hooks = []
    if rounding:
        copies: dict[nn.Module, list[torch.Tensor]] = {}

        def before(module, args):
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            temporary = [torch.empty(int(rounding * min(p.numel(), CHUNK)), dtype=torch.uint8, device=p.device)
                         for p in own]
            copies[module] = [torch.empty_like(p) for p in own]
            del temporary

        def after(module, args, out) -> None:
            copies.pop(module, None)

        hooks = [h for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
                 for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    with LiveBytes() as live, FusedAttention(device), torch.set_grad_enabled(first_order):
        loss = step_loss(model, ids, causal)
        if first_order:
            loss.backward()
        del loss
    for h in hooks:
        h.remove()
    return live.peak


def architecture(name: str) -> nn.Module:
    """The meta model of a built-in name, or of a local checkpoint's config, with the head ``load_model``
    gives it (causal LM for decoders, 2-label classification for encoders)."""
    return meta_model(name)


def estimate(model_name: str, method: str, batch_size: int, seq_len: int, dtype: str = "float32", *,
             model: nn.Module | None = None, device: str = "cuda", **options) -> dict:
    """Estimated peak memory (MB) of a training step of ``method`` on ``model_name``: see the module doc.

    model: an unadapted model to use instead of ``architecture(model_name)`` (a decoder if its class ends
    in ForCausalLM); on the meta device nothing is computed, on a real one the step really runs.
    device: whose attention kernels and AdamW path are assumed, "cuda" or "cpu".
    options: method options, as ``methods.make_config`` takes them (e.g. ``rank``, ``bottleneck``).
    """
    method = resolve_method(method)
    model = architecture(model_name) if model is None else model
    if method == "lamda++" and next(model.parameters()).is_meta:
        raise ValueError("lamda++ allocates ranks from the weights' spectra, which a meta model has not; "
                         "estimate lamda instead (same total rank)")
    causal = type(model).__name__.endswith("ForCausalLM")
    model = apply_method(model.to(getattr(torch, dtype)), method, "CAUSAL_LM" if causal else "SEQ_CLS",
                         **options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.ones(batch_size, seq_len, dtype=torch.long, device=trainable[0].device)
    zo = method in ZO_METHODS
    rounded = zo and any(p.dtype != torch.float32 for p in trainable)
    rounding = _rounding_bytes_per_element(trainable[0].dtype)[0] if rounded else 0.0
    peak = _forward_backward_peak(model, ids, causal, not zo, device, rounding)
    weights = _weight_bytes(model)
    if zo:
        gradients = 0
        optimizer, transient = _zo_memory(trainable)
        activations = max(peak, transient)
    else:
        gradients = _bytes(trainable)
        optimizer = 2 * gradients
        update = gradients if device == "cuda" else 2 * max(p.numel() * p.element_size() for p in trainable)
        activations = max(peak, gradients + update) - gradients
    parts = {"weights_mb": weights, "gradients_mb": gradients, "optimizer_mb": optimizer,
             "activations_mb": activations, "total_mb": weights + gradients + optimizer + activations}
    return {"model": model_name, "method": method, **count_parameters(model), "batch_size": batch_size,
            "seq_len": seq_len, "dtype": dtype, "device": device, "kind": "estimate",
            **{k: round(v / MB, 3) for k, v in parts.items()}}


def paper_scale(models: tuple[str, ...] = PAPER_MODELS, methods: tuple[str, ...] = PAPER_METHODS,
                batch_size: int | None = None, seq_len: int | None = None, dtype: str = "bfloat16",
                device: str = "cuda") -> dict:
    """``estimate`` of every (model, method) on meta models; batch and length default to ``PAPER_SHAPES``
    (decoders one 512-token sequence, encoders 16 of 128 tokens)."""
    rows, shapes = [], {}
    for name in models:
        default_batch, default_len = PAPER_SHAPES[model_kind(name)]
        shapes[name] = (batch_size or default_batch, seq_len or default_len)
        rows += [estimate(name, m, *shapes[name], dtype, device=device) for m in methods]
    return {"kind": "estimate", "dtype": dtype, "device": device, "shapes": shapes, "date": date.today().isoformat(),
            "torch": torch.__version__, "rows": rows}
