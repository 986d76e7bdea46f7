"""Parameter counts of methods on a model, from its configuration alone where possible (``leanft params``).

Any model ``leanft train`` takes works: a built-in name, a local folder, a hub id or a GGUF file give their
config, and the model is built on the meta device. Only LaMDA++ needs the weights (its ranks come from
their spectra), so they are loaded for it alone, and the output says so (``weights_note``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .. import methods, models


def options_for(method: str, options: dict) -> dict:
    """Only the options this method takes (a shared flag like --tt-rank does not apply to LoRA)."""
    return {k: v for k, v in options.items() if k in methods.OPTION_FIELDS[method]}


def method_names(spec: str, model: str | None = None) -> list[str]:
    """Method names of a comma list; "all" leaves out lamda++ except on the small packaged models: its ranks
    need the weights loaded, which a count should not do unasked."""
    if spec != "all":
        return [methods.resolve_method(m) for m in spec.split(",")]
    return [m for m in methods.METHODS if m != "lamda++" or model in models.PACKAGED_MODELS]


def has_weights(name: str) -> bool:
    """Whether ``models.load_model`` can load ``name``: anything but a built-in config without weights."""
    return name in models.PACKAGED_MODELS or name not in models.BUILTIN_CONFIGS


def builder(name: str, method: str) -> Callable[[], nn.Module]:
    """The model ``method`` is counted on: the meta-device architecture, or for LaMDA++ the real weights."""
    if method != "lamda++":
        return lambda: models.meta_model(name)
    if not has_weights(name):
        raise ValueError(f"lamda++ allocates ranks from the pretrained weights' spectra, and {name!r} is a config "
                         f"without weights (loadable: {', '.join(models.PACKAGED_MODELS)}, a local folder, a hub id "
                         "or a .gguf file); use lamda for meta counts")
    return lambda: models.load_model(name)[0]


def weights_note(name: str, names: list[str], spec: str = "") -> str:
    """What the counts were built on: the meta device, and the weights where LaMDA++ loaded them."""
    if "lamda++" in names:
        return (f"{name}: lamda++ on the real weights (loaded: its ranks come from their spectra); "
                "other methods on the meta device, no weights")
    left_out = "; lamda++ left out (its ranks need the weights: --method lamda++ loads them)" if spec == "all" else ""
    return f"{name} (built on the meta device, no weights{left_out})"


def count_rows(build: Callable[[str], nn.Module], task_type: str, names: list[str], options: dict) -> list[dict]:
    """Parameter counts of each method on a fresh model from ``build(method)``, and the modules it adapts."""
    rows = []
    for method in names:
        model = methods.apply_method(build(method), method, task_type, **options_for(method, options))
        counts = methods.count_parameters(model)
        rows.append({"method": method, **counts, "trainable %": f"{100 * counts['trainable'] / counts['total']:.4f}",
                     "targets": methods.describe_targets(model)})
    return rows


def lamda_rank_table(model: str, names: list[str], options: dict) -> dict[str, dict[str, int]]:
    """Per-module ranks of LaMDA / LaMDA++ (the same allocation an adapter would store in its config)."""
    from ..tuners.lamda import lamda_ranks

    bad = [m for m in names if m not in ("lamda", "lamda++")]
    if bad:
        raise ValueError(f"--show-ranks applies to lamda and lamda++, not {bad}")
    result = {}
    for method in names:
        config = methods.make_config(method, models.task_type(model), **options_for(method, options))
        result[method] = lamda_ranks(builder(model, method)(), config)
    return result
