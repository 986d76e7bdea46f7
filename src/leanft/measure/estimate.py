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
* Zeroth-order methods (``methods.ZO_METHODS``) are not modelled but run: ``zo.ZOEngine`` itself takes a
  steady-state step (``_zo_step_peak``) with the chosen optimiser (``zo.optimizers``, MeZO's sgd by default)
  on the meta model under ``LiveBytes``, its forwards included; there are no gradients. Their "optimizer"
  memory is what the engine keeps between steps: with at most ``copy_limit`` float32 trainable elements a
  snapshot and a rollback copy, and the optimiser's float32 state (momentum 1, adam 2, hizoo 1 tensor of
  the trainable set's size). Activations are the rest of the step's peak: the forward's working set, the
  noise blocks the engine keeps (4 x 1 MiB at most) and its temporaries of one piece, and, for low-precision
  weights, each module's perturbed copy during its own forward.
* Attention: on the meta device torch always takes the math path of ``scaled_dot_product_attention``
  (full S x S scores); real devices take a fused kernel when they can, which keeps O(S) per head.
  ``FusedAttention`` sends meta calls to the fused kernel's meta version when the target ``device`` would
  use one: on CUDA always (flash or memory-efficient), on CPU when torch's own CPU choice says so (not with
  attention dropout in training, for instance). Models with their own attention (DeBERTa) are as they are.

Not modelled: padding and attention masks (the sequences are full), activation checkpointing, the
allocator's caching and fragmentation, the CUDA context and library workspaces, LaMDA after P_B is frozen
(the estimate is of the phase where P_B trains), LaMDA++ on meta models (its ranks come from the weights'
spectra; it has LaMDA's total rank), zeroth-order steps with more queries than the optimiser's fewest
(their directions are drawn one query at a time, into the same few noise blocks). ``estimate_check``
measures real steps to state the error.
"""

from __future__ import annotations

import inspect
import weakref
from datetime import date
from itertools import count

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..methods import ZO_METHODS, apply_method, count_parameters, resolve_method
from ..models import meta_model, model_kind
from ..zo import OPTIMIZERS, ZOEngine, make_optimizer
from ..zo import noise as zo_noise

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
    object torch keeps alive exactly as long as the storage itself. Scratch memory inside a kernel is not
    seen, except where ``device`` is "cpu" for kthvalue (Sparse-MeZO's thresholds), which sorts a copy of
    its input with int64 indices.
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()
        self.before: dict[int, torch.UntypedStorage] = {}  # held, so their addresses are never reused
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        self.device = device

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                self.before.setdefault(t.untyped_storage()._cdata, t.untyped_storage())
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 0  # .item() of a meta tensor: only "is there a pad token?" checks ask; our ids have none
        if func is torch.ops.aten.kthvalue.default and self.device == "cpu":
            self.peak = max(self.peak, self.now + args[0].numel() * (args[0].element_size() + 8))
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


def _walk_some(engine: ZOEngine) -> None:
    """Make the engine's passes walk the first two pieces of one tensor of each shape and dtype, and nothing
    of the others (whose pieces need the same working memory): on the meta device each piece costs a few
    milliseconds, and a 70B model has 267,000 of them per pass. What is left out is the working memory of
    one piece around the other tensors (a few MiB at most, with the noise blocks); every copy and state
    tensor is still made whole."""
    first: dict = {}
    for i, p in enumerate(engine.params):
        first.setdefault((tuple(p.shape), p.dtype), i)
    walked, every = set(first.values()), engine.noise.pieces
    engine.noise.pieces = lambda i: every(i)[:2] if i in walked else []


ZO_STEADY_STEPS = zo_noise.Noise.CACHE + 1  # a zeroth-order run's steady state: the engine's noise cache is full
WALK = 64  # pieces of a trainable set beyond which ``_zo_step_peak`` walks only some (``_walk_some``)


def _zo_step_peak(model: nn.Module, ids: torch.Tensor, causal: bool, device: str, optimizer: str) -> tuple[int, int]:
    """``(held, peak)``: the bytes ``zo.ZOEngine`` keeps between steps (its copies and the optimiser's state)
    and the peak bytes of a steady-state step of ``optimizer`` (queries: the fewest it takes), both beyond
    the weights, from the engine's own code run on ``model`` under ``LiveBytes``.

    Steady state: the step measured comes after ``Noise.CACHE`` others, which have drawn the noise blocks
    the engine keeps and LOZO's factors, as in a real run's first ``ZO_STEADY_STEPS``. Losses are made up
    (distinct: every step is a healthy one that updates), and the steps before run without the model's
    forward, which changes nothing the engine keeps, unless each module's weights are swapped in inside it
    (low precision; sparse directions on large sets). Sets of more than ``WALK`` pieces walk only some
    (``_walk_some``); swapped, they start from a full noise cache instead of steps before, which would
    each cost forwards. The forward runs as the engine runs it: fzoo's and hizoo's unperturbed loss is
    computed with autograd on, as ``engine.step`` does now.
    """
    model.eval()
    made_up = count()

    def loss_fn() -> float:
        step_loss(model, ids, causal)
        return float(next(made_up))

    with LiveBytes(device) as live, FusedAttention(device):
        engine = ZOEngine(model, copy_limit=ZO_COPY_LIMIT, optimizer=make_optimizer(optimizer))
        held = live.now
        regions, frozen = engine.regions  # autocast knows no meta device: the target's (hooks only look)
        engine.regions = ({m: device if t == "meta" else t for m, t in regions.items()}, frozen)
        large = sum(len(engine.noise.pieces(i)) for i in range(len(engine.params))) > WALK
        if large:
            _walk_some(engine)
        queries = engine.optimizer.min_queries
        if large and engine.swap:  # the noise blocks of earlier steps, as big as any: float32 or int32
            for k in range(zo_noise.Noise.CACHE):
                engine.noise.block(-1 - k, 0, zo_noise.GAUSSIAN, 0, 0)
        else:
            for step in range(zo_noise.Noise.CACHE):
                engine.step(step, loss_fn if engine.swap else lambda: float(next(made_up)), queries, 1e-6)
        engine.step(zo_noise.Noise.CACHE, loss_fn, queries, 1e-6)
    return held, live.peak


def _forward_backward_peak(model: nn.Module, ids: torch.Tensor, causal: bool, first_order: bool,
                           device: str) -> int:
    """Peak bytes created by one forward (and backward, for first-order methods; in eval mode without
    autograd otherwise, as inference), weights excluded."""
    model.train(first_order)
    with LiveBytes() as live, FusedAttention(device), torch.set_grad_enabled(first_order):
        loss = step_loss(model, ids, causal)
        if first_order:
            loss.backward()
        del loss
    return live.peak


def architecture(name: str) -> nn.Module:
    """The meta model of a built-in name, or of a local checkpoint's config, with the head ``load_model``
    gives it (causal LM for decoders, 2-label classification for encoders)."""
    return meta_model(name)


def estimate(model_name: str, method: str, batch_size: int, seq_len: int, dtype: str = "float32", *,
             model: nn.Module | None = None, device: str = "cuda", zo_optimizer: str = "sgd", **options) -> dict:
    """Estimated peak memory (MB) of a training step of ``method`` on ``model_name``: see the module doc.

    model: an unadapted model to use instead of ``architecture(model_name)`` (a decoder if its class ends
    in ForCausalLM); on the meta device nothing is computed, on a real one the step really runs.
    device: whose attention kernels and AdamW path are assumed, "cuda" or "cpu".
    zo_optimizer: the zeroth-order optimiser of a zeroth-order method (``zo.OPTIMIZERS``).
    options: method options, as ``methods.make_config`` takes them (e.g. ``rank``, ``bottleneck``).
    """
    method = resolve_method(method)
    if zo_optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown zeroth-order optimizer {zo_optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if zo_optimizer != "sgd" and method not in ZO_METHODS:
        raise ValueError(f"{method} trains with AdamW: a zeroth-order optimizer ({zo_optimizer}) applies to "
                         f"{', '.join(ZO_METHODS)} only")
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
    weights = _weight_bytes(model)
    if zo:
        gradients = 0
        optimizer, peak = _zo_step_peak(model, ids, causal, device, zo_optimizer)
        activations = peak - optimizer
    else:
        peak = _forward_backward_peak(model, ids, causal, True, device)
        gradients = _bytes(trainable)
        optimizer = 2 * gradients
        update = gradients if device == "cuda" else 2 * max(p.numel() * p.element_size() for p in trainable)
        activations = max(peak, gradients + update) - gradients
    parts = {"weights_mb": weights, "gradients_mb": gradients, "optimizer_mb": optimizer,
             "activations_mb": activations, "total_mb": weights + gradients + optimizer + activations}
    return {"model": model_name, "method": method, **count_parameters(model), "batch_size": batch_size,
            "seq_len": seq_len, "dtype": dtype, "device": device, "kind": "estimate",
            **({"zo_optimizer": zo_optimizer} if zo else {}), **{k: round(v / MB, 3) for k, v in parts.items()}}


def inference(model_name: str, batch_size: int, seq_len: int, dtype: str = "float32", *,
              device: str = "cuda") -> float:
    """Estimated peak memory (MB) of one forward of the model as loaded, in eval mode without autograd:
    what zeroth-order training's memory is judged against."""
    model = architecture(model_name).to(getattr(torch, dtype))
    ids = torch.ones(batch_size, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    causal = type(model).__name__.endswith("ForCausalLM")
    return round((_weight_bytes(model) + _forward_backward_peak(model, ids, causal, False, device)) / MB, 3)


ZO_TABLE_METHODS = ("mezo", "mezo-lora")  # estimated with each zeroth-order optimiser by ``paper_scale``
STATE_WORDS = {"momentum": "a float32 momentum", "adam": "two float32 moments", "hizoo": "a float32 Hessian diagonal"}


def zo_optimizer_names(spec: str) -> tuple[str, ...]:
    """A comma-separated list of zeroth-order optimisers, "all" or "none"; an unknown name lists the valid ones."""
    if spec.strip() in ("all", "none"):
        return tuple(OPTIMIZERS) if spec.strip() == "all" else ()
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown zeroth-order optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}, "
                         "all or none")
    return names


def zo_notes(zo_rows: list[dict], lora_mb: float, inference_mb: float) -> list[str]:
    """Where an optimiser's state makes full-model zeroth-order training (the "mezo" rows of ``zo_rows``,
    ``estimate`` rows of one model) need more than first-order LoRA with AdamW (``lora_mb``) or 1.5x
    inference: that is, the row is above the limit and would not be without the state."""
    notes = []
    for r in zo_rows:
        name = r.get("zo_optimizer", "sgd")
        state_mb = OPTIMIZERS[name].state_tensors * 4 * r["trainable"] / MB
        limits = [f"{what} ({mb / 1024:,.1f} GiB)" for what, mb in
                  (("first-order LoRA with AdamW", lora_mb), ("1.5x inference", 1.5 * inference_mb))
                  if r["total_mb"] - state_mb <= mb < r["total_mb"]]
        if r["method"] == "mezo" and limits:
            notes.append(f"{r['model']}: {name} keeps {STATE_WORDS.get(name, 'float32 state')} of every weight: "
                         f"{r['trainable'] / 1e9:.1f}B weights -> {state_mb / 1024:,.1f} GiB, so full-model MeZO with "
                         f"it needs {r['total_mb'] / 1024:,.1f} GiB, more than {' and '.join(limits)}")
    return notes


def paper_scale(models: tuple[str, ...] = PAPER_MODELS, methods: tuple[str, ...] = PAPER_METHODS,
                batch_size: int | None = None, seq_len: int | None = None, dtype: str = "bfloat16",
                device: str = "cuda", zo_optimizers: tuple[str, ...] = ()) -> dict:
    """``estimate`` of every (model, method) on meta models; batch and length default to ``PAPER_SHAPES``
    (decoders one 512-token sequence, encoders 16 of 128 tokens). With ``zo_optimizers``, also
    ``ZO_TABLE_METHODS`` with each of them (``zo_rows``), each model's inference peak, and ``notes`` on
    where an optimiser's state costs more than first-order LoRA or 1.5x inference (``zo_notes``)."""
    rows, zo_rows, shapes, inference_mb, notes = [], [], {}, {}, []

    def rows_of(name: str, method: str, zo_optimizer: str = "sgd") -> list[dict]:
        """``[estimate]``, or none where the engine refuses the run (low-precision weights that the model
        reads outside their module's forward), with a note saying why."""
        if resolve_method(method) not in ZO_METHODS:
            return [estimate(name, method, *shapes[name], dtype, device=device)]
        try:
            return [estimate(name, method, *shapes[name], dtype, device=device, zo_optimizer=zo_optimizer)]
        except ValueError as e:
            note = f"{name}: {method} is not estimated, as zeroth-order training stops there: {e}"
            notes.extend([note] if note not in notes else [])
            return []

    for name in models:
        default_batch, default_len = PAPER_SHAPES[model_kind(name)]
        shapes[name] = (batch_size or default_batch, seq_len or default_len)
        rows += [r for m in methods for r in rows_of(name, m)]
        if not zo_optimizers:
            continue
        inference_mb[name] = inference(name, *shapes[name], dtype, device=device)
        lora = next((r for r in rows if r["model"] == name and r["method"] == "lora"), None)
        lora = lora or estimate(name, "lora", *shapes[name], dtype, device=device)
        mine = [r for m in ZO_TABLE_METHODS for o in zo_optimizers for r in rows_of(name, m, o)]
        zo_rows += mine
        notes += zo_notes(mine, lora["total_mb"], inference_mb[name])
    return {"kind": "estimate", "dtype": dtype, "device": device, "shapes": shapes, "date": date.today().isoformat(),
            "torch": torch.__version__, "rows": rows, "notes": notes,
            **({"zo_rows": zo_rows, "inference_mb": inference_mb} if zo_optimizers else {})}
