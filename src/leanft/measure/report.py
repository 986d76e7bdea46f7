"""Tables and plots of measurements: run comparisons (``leanft report``), a bench's report, training curves."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from .. import methods
from ..runfolder import pyplot
from . import tuning
from .budget import SHORT, Budget
from .tuning import label, summary_table


def text_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as an aligned plain-text table (first column left, the rest right)."""
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def report(metric_files: list[Path]) -> str:
    """A Markdown table of finished runs (their ``metrics.json``), one row per run, plus zero-shot.

    Zero-shot comes from the runs' evaluation before training (an adapter at its noise-free start
    is the base model), so it costs no extra run. "at end" is what the last step still updated (below
    "trainable" for LaMDA once P_B is frozen); "updates" sums the parameters updated over all steps.
    """
    runs = [json.loads(Path(f).read_text()) for f in metric_files]
    lora = next((r["trainable"] for r in runs if r["method"] == "lora"), None)
    lines = []
    for name in dict.fromkeys(t for r in runs for t in r["tasks"]):
        task_runs = [r for r in runs if name in r["eval"]]
        key = next(iter(task_runs[0]["eval"][name]))
        lines += [f"**{task_runs[0]['model']} on {name}** ({key}; "
                  f"{task_runs[0]['config']['num_train']} train, eval on {task_runs[0]['config']['num_eval']} max)", "",
                  f"| method | {key} | trainable | vs LoRA | at end | updates | peak memory (MB) | s/step | steps "
                  "| wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        zero = next((r["eval_before"][name][key] for r in task_runs if r.get("eval_before")), None)
        if zero is not None:
            lines.append(f"| zero-shot | {zero:.1f} | 0 | | | | | | | |")
        for r in task_runs:
            ratio = f"{r['trainable'] / lora:.3f}x" if lora else ""
            at_end = f"{r['trainable_at_end']:,}" if "trainable_at_end" in r else ""
            updates = f"{r['parameter_updates']:.3g}" if "parameter_updates" in r else ""
            lines.append(f"| {r['method']} | {r['eval'][name][key]:.1f} | {r['trainable']:,} | {ratio} | {at_end} | "
                         f"{updates} | {r['peak_memory_mb']:.0f} | {r['time_per_step_s']:.2f} | {r['steps']} | "
                         f"{r['wall_time_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot_runs(metric_files: list[Path], path: Path, labels: list[str] | None = None) -> None:
    """Training loss of several runs against forward passes, one PNG: methods compared at equal compute.

    Each ``X.json`` needs its log beside it as ``X.jsonl`` (the run's ``metrics.jsonl``); the loss is
    a running mean over a twentieth of the run, so zeroth-order noise does not hide the trend. The lines
    are named by ``labels`` (default: each run's method).
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, f in enumerate(map(Path, metric_files)):
        log = f.with_suffix(".jsonl")
        if not log.is_file():
            raise FileNotFoundError(f"{log}: no training log beside {f} (copy the run's metrics.jsonl there)")
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        rows = [r for r in rows if "loss" in r and not r.get("rolled_back")]
        window = max(1, len(rows) // 20)
        smooth = np.convolve([r["loss"] for r in rows], np.ones(window) / window, mode="valid")
        name = labels[k] if labels else json.loads(f.read_text())["method"]
        ax.plot([r["forwards"] for r in rows][window - 1 :], smooth, label=name)
    ax.set(xlabel="forward passes", ylabel="training loss (running mean)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_report(out: Path) -> str:
    """``out/README.md`` of a bench: budget, one table per task, peak memory, and the plots beside it.

    Results of different machines never share a report: a folder holding two is an error.
    """
    info = json.loads((out / "bench.json").read_text())
    runs = [json.loads((out / f"{name}.json").read_text()) for name in info["runs"] if (out / f"{name}.json").is_file()]
    mem = json.loads((out / "memory.json").read_text()) if (out / "memory.json").is_file() else None
    fwd = json.loads((out / "zo-steps.json").read_text()) if (out / "zo-steps.json").is_file() else None
    seen = {r["machine"] for r in runs} | {m["machine"] for m in (mem, fwd) if m}
    if len(seen) > 1:
        raise ValueError(f"{out} holds results of {len(seen)} machines ({'; '.join(sorted(seen))}): a table never "
                         "mixes devices; bench each machine into its own folder")
    b = Budget(**info["budget"])
    fo_steps = -(-int(b.train * b.epochs) // b.batch)
    lines = [f"# leanft bench: {info['model']}", "",
             f"Machine: {info['machine']} · weights {info['dtype']} · torch {info['torch']} · {info['date']}", "",
             f"Command: `{info['command']}`", "",
             f"Budget, the same for every run (seed {b.seed}): first-order methods train {b.epochs:g} epoch(s) over "
             f"{b.train} examples at batch {b.batch} (about {fo_steps} AdamW steps; "
             + (f"the checkpoint best on {b.dev} dev examples); " if b.dev else "the last step); ")
             + f"zeroth-order methods spend exactly {b.forwards} training forward passes at batch {b.zo_batch} "
             "(2 per SPSA query for most optimisers, constant lr, "
             + ("the checkpoint best on the same dev set, evaluated about 15 times along the run). " if b.dev
                else "no dev set). ")
             + f"All are evaluated on the same {b.eval} examples; evaluation forwards are not counted.", ""]
    for task in dict.fromkeys(r["tasks"][0] for r in runs):
        task_runs = [r for r in runs if r["tasks"][0] == task]
        lines += task_table(task, task_runs) + summary_table(task, task_runs)
        zo_lines, zo_plots = zo_section(out, task, task_runs, info, mem, fwd)
        plots = plot_task(out, task, task_runs) + zo_plots
        lines += zo_lines + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if mem:
        lines += [f"**Peak memory of one step** on one {mem['task']} batch of {mem['batch_size']} "
                  f"({mem['device']}, each in its own process; working = peak minus the model loaded)", "",
                  "| run | peak MB | working MB | vs inference | trainable |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | "
                  f"{r['peak_vs_inference']:.3f}x | {r['trainable']:,} |" for r in mem["rows"]]
        lines += [f"| {r['run']} | failed: {r['error'][:120]} | | | |" for r in mem.get("failed", [])]
        plot_memory(mem, out / "memory.png")
        lines += ["", "![peak memory](memory.png)", ""]
    return "\n".join(lines) + "\n"


def task_table(task: str, runs: list[dict]) -> list[str]:
    """One Markdown table of a task's runs, zero-shot first, ratios against LoRA at its default rank."""
    ok = [r for r in runs if not r.get("failed")]
    key = next(iter(ok[0]["eval"][task])) if ok else "metric"
    lora = next((r["trainable"] for r in ok if r["bench"]["slug"] == "lora"), None)
    lines = [f"## {task} ({key})", "",
             f"| method | rank | {key} | trainable | vs LoRA | params updated | peak MB | s/step | examples/s | steps "
             "| forwards | total s |", "|" + "---|" * 12]
    zero = next((r["eval_before"][task][key] for r in ok if r.get("eval_before")), None)
    if zero is not None:
        lines.append(f"| zero-shot | | {zero:.1f} | 0 | | | | | | | | |")
    for r in runs:
        meta = r["bench"]
        rank = f"{SHORT[meta['rank_option']]}={meta['rank']}" if meta["rank_option"] else ""
        if r.get("failed"):
            lines.append(f"| {label(meta)} | {rank} | failed: {r['error'][:120]} |" + " |" * 9)
            continue
        ratio = f"{r['trainable'] / lora:.3f}x" if lora else ""
        lines.append(f"| {label(meta)} | {rank} | {r['eval'][task][key]:.1f} | {r['trainable']:,} | {ratio} | "
                     f"{r['parameter_updates']:.3g} | {r['peak_memory_mb']:.0f} | {r['time_per_step_s']:.2f} | "
                     f"{r['examples_per_s']:.1f} | {r['steps']} | {r['forward_passes']} | {r['wall_time_s']:.0f} |")
    return lines + [""]


def plot_task(out: Path, task: str, runs: list[dict]) -> list[Path]:
    """A task's plots: accuracy against trainable parameters (log axis; a method's rank sweep is one
    line), first-order training loss, and zeroth-order loss against forward passes."""
    plt = pyplot()

    ok = [r for r in runs if not r.get("failed")]
    if not ok:
        return []
    key = next(iter(ok[0]["eval"][task]))
    # repeated runs (seeds at the lr chosen on dev) are one point with an error bar of one sd
    final = [r for r in ok if r["bench"].get("chosen") in (None, r["bench"].get("lr_multiplier"))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(label(r["bench"]) for r in final):
        by_size: dict = {}
        for r in final:
            if label(r["bench"]) == method:
                by_size.setdefault(r["trainable"], []).append(r)
        points = sorted((n, statistics.mean(x["eval"][task][key] for x in rs),
                         statistics.stdev([x["eval"][task][key] for x in rs]) if len(rs) > 1 else 0.0, rs[0]["bench"])
                        for n, rs in by_size.items())
        line = ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="o-",
                           capsize=3, label=method).lines[0]
        for x, y, _, meta in points if len(points) > 1 else []:
            ax.annotate(f"{SHORT[meta['rank_option']]}{meta['rank']}", (x, y), textcoords="offset points",
                        xytext=(3, 3), fontsize=7, color=line.get_color())
    zero = next((r["eval_before"][task][key] for r in ok if r.get("eval_before")), None)
    if zero is not None:
        ax.axhline(zero, color="grey", linestyle="--", linewidth=1, label="zero-shot")
    ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel=f"{task} {key}",
           title=f"{ok[0]['model']}: {task} {key} against trainable parameters")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [out / f"accuracy-vs-params-{task}.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    for kind, selected in (("loss", [r for r in ok if r["method"] not in methods.ZO_METHODS]),
                           ("zo-convergence", [r for r in ok if r["method"] in methods.ZO_METHODS])):
        # each group's default size at its chosen lr, first seed
        shown = [r for r in selected if r["bench"]["options"] == {} and r["bench"].get("role") != "seed"
                 and r["bench"].get("chosen") in (None, r["bench"].get("lr_multiplier"))]
        if shown:
            paths.append(out / f"{kind}-{task}.png")
            plot_runs([out / task / f"{r['bench']['slug']}.json" for r in shown], paths[-1],
                      [label(r["bench"]) for r in shown])
    return paths


def forwards_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Forward passes spent at a run's first dev evaluation at or above ``target`` (None: never reached)."""
    return next((f for f, score in curve if score >= target), None)


def zo_section(out: Path, task: str, runs: list[dict], info: dict, mem: dict | None,
               fwd: dict | None) -> tuple[list[str], list[Path]]:
    """Which zeroth-order optimiser to use: per trainable set and optimiser, the lr chosen on dev, the eval
    metric over seeds, the forwards to reach MeZO-SGD's final dev score on the same set, the step time against
    the forwards it takes, and peak memory; plus a plot per trainable set of dev score against forwards.
    Shown when the bench has zeroth-order runs with a dev set or more than one optimiser."""
    ok = [r for r in runs if not r.get("failed") and r["method"] in methods.ZO_METHODS]
    curves = {r["bench"]["slug"]: tuning.dev_curve(out / task / f"{r['bench']['slug']}.jsonl") for r in ok}
    optimizers = {optimizer_of(r["bench"]) for r in ok}
    if not ok or (len(optimizers) < 2 and not any(curves.values())):
        return [], []
    key = next(iter(ok[0]["eval"][task]))
    step_cost = {(r["method"], r["zo_optimizer"]): r["vs_forwards"] for r in (fwd or {}).get("rows", [])}
    peaks = {(r["method"], r.get("zo_optimizer", "sgd")): r["peak_vs_inference"] for r in (mem or {}).get("rows", [])
             if r["mode"] == "zo"}
    lines = [f"### {task}: which zeroth-order optimiser", "",
             f"Per trainable set and optimiser, at the lr chosen on dev (x its default, `tuning.default_lr`): {key} "
             "mean ± sd over seeds; the forward passes to reach MeZO-SGD's final dev score on the same set (the "
             "mean over its seeds of the last dev evaluation; per seed the first evaluation at or above it, mean "
             "over seeds; \"not reached\" when a seed never does) and their ratio to sgd's (sgd's by the same rule or, "
             "when one of its seeds ends below the mean and never reaches it, where the mean of its seeds' curves "
             "does); "
             + ("step / forwards: one step over the forwards it takes (`steps.zo_step_cost`: one batch of "
                f"{fwd['batch_size']}, in its own process after the runs, at the method's default size); " if fwd
                else "")
             + "peak / inference: the one-step peak of `leanft memory` (mezo and mezo-lora with each optimiser, "
             "adazeta with sgd), at the method's default size.", ""]
    if not fwd:
        lines += ["The step-time ratio is left out: this bench measured no step cost (it does with --memory).", ""]
    notes, asked = [], info.get("zo_queries", 1)
    if "fzoo" in optimizers:
        raised = f" (the bench's --zo-queries {asked} raised)" if asked < 2 else ""
        notes.append(f"fzoo takes Q + 1 forwards a step and needs Q >= 2: its runs use Q = {max(asked, 2)}{raised}; "
                     "on adazeta with the fixed schedule (AdaZeta's own starts at Q = 1).")
    if asked != 1 and any(r["method"] == "adazeta" for r in ok):
        notes.append("adazeta keeps its own query schedule: --zo-queries does not apply to it (fzoo aside).")
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    head = ["trainable set", "optimiser", "lr chosen", "grid (multiplier: best dev)", f"{key} mean ± sd", "seeds",
            "forwards to sgd's final dev", "vs sgd", "s/step"] + (["step / forwards"] if fwd else []) + \
        ["peak / inference"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    plots = []
    for zo_set in dict.fromkeys(r["bench"]["set"] for r in ok):
        groups: dict = {}  # optimiser -> its runs on this set (grid, extensions, seeds)
        for r in ok:
            if r["bench"]["set"] == zo_set:
                groups.setdefault(optimizer_of(r["bench"]), []).append(r)
        final = {opt: tuning.chosen_runs(members) for opt, members in groups.items()}
        sgd = final.get("sgd", (None, []))[1]
        ends = [curves[r["bench"]["slug"]][-1][1] for r in sgd if curves[r["bench"]["slug"]]]
        target = statistics.mean(ends) if ends and len(ends) == len(sgd) else None
        reach = {}
        for opt, (_, rs) in final.items():
            hits = [forwards_to_reach(curves[r["bench"]["slug"]], target) for r in rs] if target is not None else []
            reach[opt] = statistics.mean(hits) if hits and None not in hits else None
        # sgd's seeds that end below their mean may never reach it: then its mean curve's first point at or
        # above the target is the reference (its last evaluation at the latest, the target being its mean)
        sgd_reach = reach.get("sgd") or (forwards_to_reach(mean_curve([curves[r["bench"]["slug"]] for r in sgd]),
                                                           target - 1e-9) if target is not None else None)
        for opt, (chosen, rs) in final.items():
            if not rs:
                lines.append(f"| {zo_set} | {opt} | no lr: every run of the grid failed |" + " |" * (len(head) - 3))
                continue
            meta, values = rs[0]["bench"], [r["eval"][task][key] for r in rs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            lr = (f"{rs[0]['lr']:.2g}" + (f" (x{chosen:g})" if chosen is not None else "")
                  + (" at the edge" if meta.get("at_edge") else ""))
            hit = ("no sgd dev curve" if target is None else "not reached" if reach[opt] is None
                   else f"{reach[opt]:.0f}")
            ratio = f"{reach[opt] / sgd_reach:.2f}x" if reach[opt] is not None and sgd_reach else ""
            row = [zo_set, opt, lr, tuning.grid_scores(groups[opt]), f"{statistics.mean(values):.1f} ± {sd:.1f}",
                   str(len(values)), hit, ratio, f"{statistics.mean(r['time_per_step_s'] for r in rs):.3g}"]
            if fwd:  # measured at the method's default size
                cost = step_cost.get((meta["method"], opt)) if not meta["options"] else None
                row.append(f"{cost:.2f}x" if cost else "not measured")
            peak = peaks.get((meta["method"], opt)) if not meta["options"] else None  # measured at the default size
            row.append(f"{peak:.3f}x" if peak else "not measured")
            lines.append("| " + " | ".join(row) + " |")
        path = out / f"dev-vs-forwards-{task}-{zo_set}.png"
        if plot_dev_curves({opt: [curves[r["bench"]["slug"]] for r in rs] for opt, (_, rs) in final.items() if rs},
                           target, f"{ok[0]['model']}: {task} dev score, {zo_set}", path):
            plots.append(path)
    return lines + [""], plots


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Seeds' dev curves (evaluated at the same forwards) averaged point by point, up to the shortest."""
    n = min(map(len, curves), default=0)
    return [(curves[0][i][0], statistics.mean(c[i][1] for c in curves)) for i in range(n)]


def optimizer_of(meta: dict) -> str:
    return meta.get("zo", {}).get("zo_optimizer", "sgd")


def plot_dev_curves(curves: dict[str, list[list[tuple[int, float]]]], target: float | None, title: str,
                    path: Path) -> bool:
    """Dev score against forward passes, one line per optimiser: the mean over its seeds' curves (evaluated at
    the same forwards, the budget spaced alike) with a band of one sd; MeZO-SGD's final dev score dashed.
    False (and no file) when no run has a dev curve."""
    drawn = {name: seeds for name, seeds in curves.items() if seeds and all(seeds)}
    if not drawn:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, seeds in drawn.items():
        n = min(map(len, seeds))
        x = np.array([f for f, _ in seeds[0][:n]])
        y = np.array([[s for _, s in c[:n]] for c in seeds])
        mean, sd = y.mean(axis=0), (y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(n))
        line = ax.plot(x, mean, marker=".", label=name)[0]
        ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="sgd's final dev")
    ax.set(xlabel="training forward passes", ylabel="dev score", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(mem: dict, path: Path) -> None:
    """Peak memory of one step per method as bars, with inference as the reference line."""
    plt = pyplot()

    rows = mem["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh([r["run"] for r in rows], [r["peak_mb"] for r in rows], color="tab:blue")
    ref = next(r["peak_mb"] for r in rows if r["mode"] == "inference")
    ax.axvline(ref, color="grey", linestyle="--", linewidth=1, label="inference")
    ax.invert_yaxis()
    ax.set(xlabel=f"peak memory of one step, MB ({mem['device']})", title=f"{mem['model']}, batch {mem['batch_size']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def estimate_markdown(result: dict) -> str:
    """A Markdown table of ``estimate.paper_scale`` or ``estimate.check_all`` results."""
    rows = result["rows"]
    if "measured_mb" in rows[0]:
        cpu = result["device"] == "cpu"
        lines = [f"**Training memory: estimate vs measured peak** ({result['device']}, float32, batch "
                 f"{result['batch_size']} x {result['seq_len']} tokens, {result['steps']} steps; MB)", "",
                 "| model | method | trainable | estimate | measured | error |"
                 + (" CPU allocator peak | error |" if cpu else ""),
                 "|---|---|---|---|---|---|" + ("---|---|" if cpu else "")]
        for r in rows:
            extra = f" {r['allocated_mb']:,.0f} | {r['allocated_error']:+.1%} |" if cpu else ""
            lines.append(f"| {r['model']} | {r['method']} | {r['trainable']:,} | {r['total_mb']:,.0f} | "
                         f"{r['measured_mb']:,.0f} | {r['measured_error']:+.1%} |{extra}")
        return "\n".join(lines)
    shapes = ", ".join(f"{m} {b} x {s}" for m, (b, s) in result["shapes"].items())
    lines = [f"**Training memory estimate** ({result['dtype']} weights, adapters fp32, {result['device']} "
             f"kernels, AdamW or SPSA; batch x tokens: {shapes}; MB)", "",
             "| model | method | trainable | weights | gradients | optimizer | activations | total |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['trainable']:,} | {r['weights_mb']:,.0f} | "
                     f"{r['gradients_mb']:,.0f} | {r['optimizer_mb']:,.0f} | {r['activations_mb']:,.0f} | "
                     f"{r['total_mb']:,.0f} |")
    lines += ["", "activations: all else at the step's peak: what forward and backward hold beyond the gradients "
              "(a forward's working set for zeroth-order methods), or the optimiser's update temporaries when larger."]
    return "\n".join(lines)


def _layers_markdown(result: dict) -> list[str]:
    lines = [f"### Adapter layers vs PEFT LoRA on {result['device']} ({result['machine']}), base dtype "
             f"{result['dtype']}, {result['tokens']} tokens; torch {result['torch']}, {result['date']}", "",
             "Median of the rounds (forward/forward+backward) per size: "
             + ", ".join(f"{d}: {n['fwd']}/{n['fwdbwd']}" for d, n in result["rounds"].items())
             + f". Memory: {result['memory']}. MACs/token: {result.get('flops', 'not counted')}.", "",
             ("| d | method | trainable | fwd ms | fwd+bwd ms | mem MB | fwd MACs/token | fwd+bwd MACs/token "
              "| fwd vs LoRA | fwd+bwd vs LoRA | mem vs LoRA |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        macs = [f"{r[k]:,.0f}" if k in r else "" for k in ("fwd_macs_per_token", "fwdbwd_macs_per_token")]
        lines.append(f"| {r['d']} | {r['method']} | {r['trainable']:,} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
                     f"{r['mem_mb']:.3f} | {macs[0]} | {macs[1]} | {r['fwd_vs_lora']} | {r['fwdbwd_vs_lora']} | "
                     f"{r['mem_vs_lora']} |")
    return lines


def _contractions_markdown(result: dict) -> list[str]:
    modes = list(dict.fromkeys(m for r in result["rows"] for m in r["fwd_ms"]))
    passing = sum(r["ok"] for r in result["rows"])
    header = ["d", "matrix", "shape", "tokens", *(f"{m} ms" for m in modes), "auto", "fastest", "choice/fastest",
              "auto/fastest", "ok", *(f"fwd+bwd {m} ms" for m in modes), "fwd+bwd auto/fastest", "ok"]
    lines = [f"### TT contractions on {result['device']} ({result['machine']}), dtype {result['dtype']}; "
             f"torch {result['torch']}, {result['date']}", "",
             f"Fastest of {result['repeats']} samples. Automatic choice within {result['tolerance']:.2f}x of the "
             f"fastest (forward): {passing} of {len(result['rows'])} cases.", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in result["rows"]:
        cells = [r["d"], f"{r['matrix']} {r['in']}x{r['out']}", r["shape"], r["tokens"],
                 *(f"{r['fwd_ms'][m]:.3f}" if m in r["fwd_ms"] else "" for m in modes),
                 r["auto"], r["fastest"], r["choice_vs_fastest"], r["auto_vs_fastest"], "yes" if r["ok"] else "**no**",
                 *(f"{r['fwdbwd_ms'][m]:.3f}" if m in r["fwdbwd_ms"] else "" for m in modes),
                 r["fwdbwd_auto_vs_fastest"], "yes" if r["fwdbwd_ok"] else "**no**"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def micro_markdown(result: dict) -> str:
    """A Markdown table of a ``micro.layer_bench`` or ``micro.contraction_bench`` result, device and dtype
    in the heading."""
    lines = _layers_markdown(result) if result["kind"] == "layers" else _contractions_markdown(result)
    return "\n".join(lines) + "\n"
