"""Parameter counts of methods on a model, from its configuration alone where possible (``leanft params``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .. import methods, models


def options_for(method: str, options: dict) -> dict:
    """Only the options this method takes (a shared flag like --tt-rank does not apply to LoRA)."""
    return {k: v for k, v in options.items() if k in methods.OPTION_FIELDS[method]}


def method_names(spec: str, model: str | None = None) -> list[str]:
    """Method names of a comma list; "all" leaves out lamda++ where no pretrained weights exist for its ranks."""
    if spec != "all":
        return [methods.resolve_method(m) for m in spec.split(",")]
    return [m for m in methods.METHODS if m != "lamda++" or model in models.PACKAGED_MODELS]


def builder(name: str, names: list[str]) -> Callable[[], nn.Module]:
    """Meta-device models, unless LaMDA++ needs the pretrained spectra: then the real weights."""
    if "lamda++" not in names:
        return lambda: models.meta_model(name)
    if name not in models.PACKAGED_MODELS:
        raise ValueError(f"lamda++ allocates ranks from the pretrained weights' spectra, and {name!r} has no "
                         f"weights here (it has: {', '.join(models.PACKAGED_MODELS)}); use lamda for meta counts")
    return lambda: models.load_model(name)[0]


def count_rows(build: Callable[[], nn.Module], task_type: str, names: list[str], options: dict) -> list[dict]:
    """Parameter counts of each method on a fresh model from ``build()``."""
    rows = []
    for method in names:
        model = methods.apply_method(build(), method, task_type, **options_for(method, options))
        counts = methods.count_parameters(model)
        rows.append({"method": method, **counts, "trainable %": f"{100 * counts['trainable'] / counts['total']:.4f}"})
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
        result[method] = lamda_ranks(builder(model, [method])(), config)
    return result
