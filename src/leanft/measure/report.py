"""Tables and plots of measurements: run comparisons (``leanft report``), a bench's report, training curves."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from .. import methods
from ..runfolder import pyplot
from .budget import SHORT, Budget
from .tuning import summary_table


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


def plot_runs(metric_files: list[Path], path: Path) -> None:
    """Training loss of several runs against forward passes, one PNG: methods compared at equal compute.

    Each ``X.json`` needs its log beside it as ``X.jsonl`` (the run's ``metrics.jsonl``); the loss is
    a running mean over a twentieth of the run, so zeroth-order noise does not hide the trend.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for f in map(Path, metric_files):
        log = f.with_suffix(".jsonl")
        if not log.is_file():
            raise FileNotFoundError(f"{log}: no training log beside {f} (copy the run's metrics.jsonl there)")
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        rows = [r for r in rows if "loss" in r and not r.get("rolled_back")]
        window = max(1, len(rows) // 20)
        smooth = np.convolve([r["loss"] for r in rows], np.ones(window) / window, mode="valid")
        ax.plot([r["forwards"] for r in rows][window - 1 :], smooth, label=json.loads(f.read_text())["method"])
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
    seen = {r["machine"] for r in runs} | ({mem["machine"]} if mem else set())
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
             f"(2 per SPSA query, constant lr, no dev set). All are evaluated on the same {b.eval} examples; "
             "evaluation forwards are not counted.", ""]
    for task in dict.fromkeys(r["tasks"][0] for r in runs):
        task_runs = [r for r in runs if r["tasks"][0] == task]
        lines += task_table(task, task_runs) + summary_table(task, task_runs)
        plots = plot_task(out, task, task_runs)
        lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
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
            lines.append(f"| {meta['method']} | {rank} | failed: {r['error'][:120]} |" + " |" * 9)
            continue
        ratio = f"{r['trainable'] / lora:.3f}x" if lora else ""
        lines.append(f"| {meta['method']} | {rank} | {r['eval'][task][key]:.1f} | {r['trainable']:,} | {ratio} | "
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
    for method in dict.fromkeys(r["method"] for r in final):
        by_size: dict = {}
        for r in final:
            if r["method"] == method:
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
        files = [out / task / f"{r['bench']['slug']}.json" for r in selected
                 if r["bench"]["options"] == {} and r["bench"].get("role") != "seed"]
        if files:
            paths.append(out / f"{kind}-{task}.png")
            plot_runs(files, paths[-1])
    return paths


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
