"""How a perturbed forward computes: float32 regions under autocast, and weights swapped in per module.

Two problems of perturbing inside a low-precision forward, each solved by forward hooks so the model's code
is untouched:

* Float32 adapters under autocast (``float32_compute``): autocast would cast a float32 trainable tensor to
  bfloat16 where it is used, and a perturbation of 1e-3 on an element of 0.2 is below half its unit in the
  last place: the forward would apply a rounded perturbation, with many elements not moved at all. The
  modules around float32 trainable tensors (adapter layers, TT heads, trained norms) compute in float32,
  their frozen base layers as before.
* Weights that must not be modified while perturbed (``swapped``): low-precision weights, where adding
  ``eps z`` in place would mostly do nothing, and directions that read the weights (Sparse-MeZO's mask).
  Each module's trainable weights read as the perturbed copy during its own forward only, so one module's
  copy exists at a time and the weights come back exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def owners(model: torch.nn.Module, params: list[torch.Tensor]) -> list[tuple[torch.nn.Module, str, int]]:
    """Every (module, attribute, parameter index) that holds a trainable parameter directly; a tied
    weight appears once per module that holds it."""
    index = {p: i for i, p in enumerate(params)}
    return [(m, name, index[p]) for m in model.modules() for name, p in m._parameters.items()
            if p is not None and p in index]


def float32_regions(model: torch.nn.Module, params: list[torch.Tensor]):
    """Where a perturbed forward computes in float32: ``(regions, frozen)``. A region (module -> device
    type) is, for each module holding a float32 trainable parameter, the lowest module around it that
    also holds frozen parameters (an adapter layer with its base layer, a wrapper with the original), or
    the whole model; so code that reads the parameter outside its own module's forward (a factor made
    dense, a frozen start copy subtracted) is inside too. ``frozen`` are the regions' children without
    trainable parameters (base layers): they compute as before. A region that itself holds a frozen
    low-precision tensor is left out: float32 code cannot read it."""
    parent = {child: m for m in model.modules() for child in m.children()}
    regions = {}
    for module, _, i in owners(model, params):
        if params[i].dtype != torch.float32:
            continue
        while module in parent and all(p.requires_grad for p in module.parameters()):
            module = parent[module]
        if all(p.dtype == torch.float32 for p in module.parameters(recurse=False)):
            regions[module] = params[i].device.type
    frozen = {c for m in regions for c in m.children()
              if any(not p.requires_grad for p in c.parameters()) and not any(p.requires_grad for p in c.parameters())}
    return regions, frozen


def _float32(x):
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


@contextlib.contextmanager
def float32_compute(regions: dict[torch.nn.Module, str], frozen: set[torch.nn.Module]):
    """While a perturbed loss is computed under autocast, each region (``float32_regions``) runs without
    autocast, its floating inputs made float32, and its frozen children run under the autocast it left.
    Under autocast a float32 trainable tensor is cast to the low dtype where it is used, rounding
    ``eps z`` away for most elements (a bfloat16 element of 0.2 moves in steps of 1e-3), so the loss would
    not see the perturbation the update assumes. Outside autocast the hooks change nothing."""
    entered: list = []  # per running hooked module: the autocast context it entered, or None
    left: list[tuple[str, torch.dtype]] = []  # the autocast each running region turned off

    def into_region(module, args, kwargs):
        device = regions[module]
        if not torch.is_autocast_enabled(device):
            entered.append(None)
            return None
        left.append((device, torch.get_autocast_dtype(device)))
        entered.append(torch.autocast(device, enabled=False))
        entered[-1].__enter__()
        return tuple(map(_float32, args)), {k: _float32(v) for k, v in kwargs.items()}

    def into_frozen(module, args):
        if not left or torch.is_autocast_enabled(left[-1][0]):
            entered.append(None)
            return
        entered.append(torch.autocast(left[-1][0], dtype=left[-1][1]))
        entered[-1].__enter__()

    def out_of(module, args, output):
        context = entered.pop()
        if context is not None:
            context.__exit__(None, None, None)
            if module in regions:
                left.pop()

    hooks = [m.register_forward_pre_hook(into_region, with_kwargs=True) for m in regions]
    hooks += [m.register_forward_pre_hook(into_frozen) for m in frozen]
    hooks += [m.register_forward_hook(out_of) for m in (*regions, *frozen)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for context in reversed(entered):  # a forward that raised midway
            if context is not None:
                context.__exit__(None, None, None)


@contextlib.contextmanager
def swapped(held_by: list[tuple[torch.nn.Module, str, int]], names: list[str],
            perturbed: Callable[[int], torch.Tensor]):
    """While the loss is computed, each module's trainable weights (``held_by``: module, attribute, index)
    read as ``perturbed(index)`` during its own forward; the original tensors are put back after it (and
    on any error). A trainable tensor used outside its module's forward is an error (``names`` name them)."""
    held: dict[tuple[torch.nn.Module, str], torch.Tensor] = {}
    seen: set[int] = set()
    by_module: dict[torch.nn.Module, list[tuple[str, int]]] = {}
    for module, name, i in held_by:
        by_module.setdefault(module, []).append((name, i))

    def before(module, args):
        for name, i in by_module[module]:
            param = module._parameters[name]
            held[module, name] = param.data
            kind = param.device.type
            # the perturbed weights are made in float32 whatever autocast the forward runs under (a low-rank
            # direction is a matmul, which autocast would compute in bfloat16)
            off = torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext()
            with off:
                param.data = perturbed(i)
            seen.add(i)

    def after(module, args, output):
        for name, _ in by_module[module]:
            module._parameters[name].data = held.pop((module, name))

    hooks = [h for m in by_module for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for (module, name), data in held.items():  # a forward that raised midway
            module._parameters[name].data = data
    missing = [names[i] for i in range(len(names)) if i not in seen]
    if missing:
        raise ValueError(f"zeroth-order training of low-precision weights (or with sparse directions) perturbs "
                         f"each weight inside its module's forward, and {len(missing)} trainable parameter(s) were "
                         f"used outside one (e.g. {missing[:3]}); train in float32 (--dtype float32) or with an "
                         "adapter method")
