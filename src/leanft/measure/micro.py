"""Micro-benchmarks of single adapter layers and of the TT contractions inside them.

``layer_bench`` times one square linear layer adapted by each method (forward, forward+backward),
measures the memory its training step needs and counts the adapter's multiply-adds per token, against
PEFT LoRA at the same shapes (LoRETTA's starts compare as ``loretta-rep`` against ``loretta-rep-zero``,
see ``START_VARIANTS``); ``contraction_bench``
times every TT matrix those layers build with each contraction forced and with the automatic choice, to
check that ``TTMatrix.choose_contraction`` picks a contraction within 10% of the fastest. Both run on the
current device and return plain dicts (JSON-ready) that ``report.micro_markdown`` turns into tables.
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import date
from typing import Callable

import torch
from peft import get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import methods as methods_lib
from ..models import default_device
from ..system import machine
from ..tt import TTMatrix

HIDDEN_SIZES = (576, 1024, 2048, 4096, 8192)
LAYER_METHODS = ("lora", "loretta-rep", "loretta-adp", "lamda")
TT_METHODS = ("loretta-rep", "loretta-adp")
# Layer-bench names for a method with a named start: name -> (method, init_mode). The plain names keep the
# method's default start (LoRETTA_rep: noise_free, LoRETTA_adp: zero_core).
START_VARIANTS = {
    f"{method}-{suffix}": (method, mode) for method in ("loretta-rep", "loretta-adp")
    for suffix, mode in (("zero", "zero_core"), ("noise-free", "noise_free"), ("reference", "reference"))
}
TOKEN_COUNTS = (1, 64, 512, 4096)
AUTO_TOLERANCE = 1.10  # the automatic contraction may be at most this much slower than the fastest
MIN_ROUNDS, MAX_ROUNDS = 5, 100  # bounds on the rounds that layer_bench fits into its time per size

CPU_MEMORY = ("bytes autograd saves for backward (each storage once; parameters and buffers not counted, the "
              "input counted when a method saves it) plus the gradients of the trainable parameters")
CUDA_MEMORY = "peak allocated bytes of one forward+backward above what was allocated before it"
FLOPS = ("adapter multiply-adds per token: matrix-product FLOPs that torch.utils.flop_counter.FlopCounterMode "
         "counts in the adapted layer's call minus those of the bare layer, halved, divided by the tokens (so the "
         "token-independent TT core products are spread over the tokens; element-wise operations not counted)")


class Block(nn.Module):
    """A model made of one linear named ``proj``: the smallest thing PEFT can adapt by target name."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(method: str, base: nn.Linear) -> Block:
    """A ``Block`` around a frozen linear sharing ``base``'s weights, adapted by ``method``'s defaults.

    ``"base"`` leaves it bare: the reference. A name of ``START_VARIANTS`` is its method with that start.
    Weights are shared, not copied, so every method sees the same matrix at no extra memory. LoRETTA_adp
    gets an output adapter (its placement for explicit targets): in series after the linear, as on a BERT
    output dense. The inner model of the PeftModel is returned so that every method is called the same
    way, without PeftModel's forward wrapper.
    """
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight, linear.bias = base.weight, base.bias
    block = Block(linear.requires_grad_(False))
    if method == "base":
        return block
    method, init_mode = START_VARIANTS.get(method, (method, None))
    torch.manual_seed(0)
    config = methods_lib.make_config(method, None, target_modules=["proj"], init_mode=init_mode)
    return get_peft_model(block, config).get_base_model()


def _matmul_flops(fn: Callable[[], object]) -> int:
    """Matrix-product FLOPs (2 per multiply-add) that ``fn`` runs, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def adapter_macs(block: nn.Module, bare: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Adapter multiply-adds per token of ``block`` over ``bare`` (the same layer unadapted), for the
    forward (eval mode, no autograd) and the forward+backward (loss ``sum``, ``x`` requiring grad): see
    ``FLOPS``. The counts are of what the layer really runs, whichever TT contraction it picks."""
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    x_grad = x.detach().clone().requires_grad_()

    def forward(b: nn.Module) -> int:
        with torch.no_grad():
            return _matmul_flops(lambda: b.eval()(x))

    def both(b: nn.Module) -> int:
        flops = _matmul_flops(lambda: b.train()(x_grad).sum().backward())
        b.zero_grad(set_to_none=True)
        return flops

    return {"fwd": (forward(block) - forward(bare)) / (2 * tokens),
            "fwdbwd": (both(block) - both(bare)) / (2 * tokens)}


def tt_matrices(model: nn.Module) -> dict[str, TTMatrix]:
    """The trainable TT matrices of an adapted ``Block`` by module path (e.g. ``loretta_rep_A``).

    The frozen copies of the noise-free start have the same shapes and are left out.
    """
    return {
        name.removeprefix("proj.").replace(".default", ""): m
        for name, m in model.named_modules()
        if isinstance(m, TTMatrix) and m.trainable
    }


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device else default_device()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, number: int = 1) -> float:
    """Seconds per call over ``number`` back-to-back calls, device work included."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / number


def _times(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int | None,
    min_sample_s: float,
    *,
    inference: bool = False,
    budget_s: float = 0.0,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> tuple[dict[str, float], int]:
    """Seconds per call of each function (``statistic`` of its samples) and the number of rounds, sampled
    round-robin so that load drift hits all alike.

    A warm-up call of each sizes its samples: enough back-to-back calls to last ``min_sample_s``, so that
    timer and synchronisation overhead do not swamp microsecond calls. ``repeats=None`` runs as many
    rounds as fit in ``budget_s`` (within ``MIN_ROUNDS`` and ``MAX_ROUNDS``).
    """
    with torch.inference_mode(inference):
        warm = {name: _timed(fn, device) for name, fn in fns.items()}
        number = {name: max(1, math.ceil(min_sample_s / max(t, 1e-9))) for name, t in warm.items()}
        round_s = sum(max(t, min_sample_s) for t in warm.values())
        rounds = repeats or min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget_s / round_s)))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(_timed(fn, device, number[name]))
    return {name: statistic(s) for name, s in samples.items()}, rounds


def _saved_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``block(x)``, each storage once, the block's own
    parameters and buffers left out (they exist whether or not the step trains)."""
    owned = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = block(x).sum()
    loss.backward()
    return sum(saved.values())


def _train_memory(block: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """Memory of one training forward+backward in bytes: ``CUDA_MEMORY`` on CUDA, ``CPU_MEMORY`` elsewhere."""
    block.train().zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        block(x).sum().backward()
        _sync(device)
        used = torch.cuda.max_memory_allocated(device) - start
    else:
        used = _saved_bytes(block, x)
        used += sum(p.grad.numel() * p.grad.element_size() for p in block.parameters() if p.grad is not None)
    block.zero_grad(set_to_none=True)
    return used


def _header(kind: str, device: torch.device, dtype: torch.dtype | None) -> dict:
    return {
        "kind": kind, "device": device.type, "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "machine": machine(device), "torch": torch.__version__, "date": date.today().isoformat(),
    }


def _ratio(value: float, reference: float | None) -> float | None:
    return round(value / reference, 3) if reference else None


def layer_bench(
    hidden_sizes: tuple[int, ...] = HIDDEN_SIZES,
    methods: tuple[str, ...] = LAYER_METHODS,
    tokens: int = 512,
    *,
    repeats: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seconds_per_size: float = 20.0,
    min_sample_s: float = 0.005,
) -> dict:
    """Forward and forward+backward time and training memory of a ``d x d`` linear adapted by each method.

    Every method (plus ``"base"``, the bare frozen linear) wraps the same random weights with its default
    hyperparameters; base weights and input are in ``dtype`` (bfloat16 on CUDA, float32 on CPU by
    default), adapters in whatever dtype leanft or PEFT keeps them. Forward runs in eval mode under
    ``inference_mode``; forward+backward runs in train mode (dropout on, as in training) with loss
    ``output.sum()`` and an input that requires grad, as inside a network whose earlier layers train, so
    backward also goes through the base layer; gradients accumulate across calls, as in gradient
    accumulation. Times are medians over ``repeats`` rounds (``None``: as many as fit in
    ``seconds_per_size``, within ``MIN_ROUNDS`` and ``MAX_ROUNDS``); each round runs all methods in turn,
    each sample lasting at least ``min_sample_s``. Memory is described in the result's ``memory`` field,
    the adapter's multiply-adds per token (forward, forward+backward) in its ``flops`` field. Ratios are
    against LoRA's row. ``methods`` may name ``START_VARIANTS`` (e.g. ``loretta-rep-zero``).
    """
    device = _device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    result = {**_header("layers", device, dtype), "statistic": "median", "tokens": tokens, "rounds": {},
              "memory": CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY, "flops": FLOPS, "rows": []}
    for d in hidden_sizes:
        torch.manual_seed(0)
        base = nn.Linear(d, d, device=device, dtype=dtype)
        blocks = {name: build(name, base) for name in ("base", *methods)}
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        x_grad = x.clone().requires_grad_()
        budget = seconds_per_size / 2
        for block in blocks.values():
            block.eval()
        forward_fns = {name: (lambda b=b: b(x)) for name, b in blocks.items()}
        forward, fwd_rounds = _times(forward_fns, device, repeats, min_sample_s, inference=True, budget_s=budget)
        for block in blocks.values():
            block.train()
        both_fns = {name: (lambda b=b: b(x_grad).sum().backward()) for name, b in blocks.items()}
        both, both_rounds = _times(both_fns, device, repeats, min_sample_s, budget_s=budget)
        memory = {name: _train_memory(b, x, device) for name, b in blocks.items()}
        macs = {name: adapter_macs(b, blocks["base"], x) for name, b in blocks.items()}
        result["rounds"][d] = {"fwd": fwd_rounds, "fwdbwd": both_rounds}
        fwd_ms = {name: round(1000 * t, 4) for name, t in forward.items()}
        both_ms = {name: round(1000 * t, 4) for name, t in both.items()}
        for name, block in blocks.items():
            result["rows"].append({
                "d": d, "method": name, "trainable": methods_lib.count_parameters(block)["trainable"],
                "fwd_ms": fwd_ms[name], "fwdbwd_ms": both_ms[name],
                "mem_bytes": memory[name], "mem_mb": round(memory[name] / 2**20, 3),
                "fwd_macs_per_token": round(macs[name]["fwd"], 1),
                "fwdbwd_macs_per_token": round(macs[name]["fwdbwd"], 1),
                "fwd_vs_lora": _ratio(fwd_ms[name], fwd_ms.get("lora")),
                "fwdbwd_vs_lora": _ratio(both_ms[name], both_ms.get("lora")),
                "mem_vs_lora": _ratio(memory[name], memory.get("lora")),
            })
        del blocks, base
    return result


def _contraction_row(
    d: int, method: str, name: str, tt: TTMatrix, tokens: int, *, device: torch.device, repeats: int,
    min_sample_s: float,
) -> dict:
    """Times of ``tt`` with each contraction forced and chosen automatically, for ``tokens`` rows."""
    x = torch.randn(tokens, tt.in_features, device=device)
    x_grad = x.clone().requires_grad_()
    modes = list(tt.contraction_costs(tokens))
    with torch.inference_mode():
        outputs = [tt(x, mode) for mode in modes]
    max_diff = max(float((y - outputs[0]).abs().max()) for y in outputs) / float(outputs[0].abs().max())
    forward = {mode: (lambda m=mode: tt(x, m)) for mode in modes} | {"auto": lambda: tt(x)}
    both = {mode: (lambda m=mode: tt(x_grad, m).sum().backward()) for mode in modes}
    both["auto"] = lambda: tt(x_grad).sum().backward()
    fwd = _times(forward, device, repeats, min_sample_s, inference=True, statistic=min)[0]
    bwd = _times(both, device, repeats, min_sample_s, statistic=min)[0]
    fwd, bwd = ({k: round(1000 * t, 4) for k, t in times.items()} for times in (fwd, bwd))
    tt.zero_grad(set_to_none=True)
    fastest, bwd_fastest = min(modes, key=fwd.get), min(modes, key=bwd.get)
    ratio, bwd_ratio = fwd["auto"] / fwd[fastest], bwd["auto"] / bwd[bwd_fastest]
    auto = tt.choose_contraction(tokens)
    return {
        "d": d, "method": method, "matrix": name, "shape": tt.shape, "in": tt.in_features, "out": tt.out_features,
        "tt_rank": tt.rank, "tokens": tokens, "auto": auto, "max_diff": max_diff, "fwd_ms": fwd, "fastest": fastest,
        "choice_vs_fastest": round(fwd[auto] / fwd[fastest], 3), "auto_vs_fastest": round(ratio, 3),
        "ok": ratio <= AUTO_TOLERANCE,
        "fwdbwd_ms": bwd, "fwdbwd_fastest": bwd_fastest, "fwdbwd_auto_vs_fastest": round(bwd_ratio, 3),
        "fwdbwd_ok": bwd_ratio <= AUTO_TOLERANCE,
    }


def contraction_bench(
    hidden_sizes: tuple[int, ...] = HIDDEN_SIZES,
    tokens: tuple[int, ...] = TOKEN_COUNTS,
    methods: tuple[str, ...] = TT_METHODS,
    repeats: int = 7,
    device: torch.device | str | None = None,
    min_sample_s: float = 0.005,
) -> dict:
    """Each TT matrix that ``methods`` build on a ``d x d`` linear, timed per contraction and token count.

    The matrices are taken from the built layers (so their shapes and ranks are the ones leanft really
    uses), in float32 as leanft keeps them. Times are the fastest of ``repeats`` round-robin samples: the
    10% rule is about what each contraction costs, and on a shared machine slow samples are other
    processes' doing (medians there swing by more than 10%). ``ok`` says whether the automatic choice is
    within ``AUTO_TOLERANCE`` of the fastest forced contraction (forward; ``fwdbwd_ok`` for
    forward+backward, which the cost model does not consider). ``choice_vs_fastest`` times the chosen
    contraction forced, so it tells a wrong choice from the cost of choosing (or noise) in
    ``auto_vs_fastest``; ``max_diff`` is the largest difference between the contractions' outputs relative
    to the largest output.
    """
    device = _device(device)
    result = {**_header("contractions", device, torch.float32), "statistic": "min", "repeats": repeats,
              "tolerance": AUTO_TOLERANCE, "rows": []}
    for d in hidden_sizes:
        base = nn.Linear(d, d, device=device)
        for method in methods:
            # the reference (random) start: same shapes, and no zeroed core to make the outputs vanish
            for name, tt in tt_matrices(build(f"{method}-reference", base)).items():
                for n in tokens:
                    result["rows"].append(_contraction_row(d, method, name, tt, n, device=device, repeats=repeats,
                                                           min_sample_s=min_sample_s))
    result["all_ok"] = all(row["ok"] for row in result["rows"])
    return result
