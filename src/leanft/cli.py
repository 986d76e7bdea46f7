"""The ``leanft`` command line: argparse, and each command handed to the library function that does it.

All argparse lives here. The ``train`` and ``eval`` flags are built from ``TrainConfig``'s fields
(``add_train_flags``): a flag's type, default, choices and help are in its field's declaration in
``leanft/config.py``; only the method option flags (``METHOD_FLAGS``) and the other commands' flags are here."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from dataclasses import fields
from datetime import date
from pathlib import Path

import huggingface_hub
import transformers
import yaml

from . import methods, models
from .config import TrainConfig
from .loading import read_json
from .measure import bench, budget, params, report, steps
from .precision import DTYPES
from .runfolder import DATA_SOURCE, rerun_data
from .system import save
from .train import Interrupted, train

# The train flags (train and eval): one per TrainConfig field, built from its declaration, and the method options.


def comma_list(value: str) -> list[str]:
    """A comma-separated flag value as a list (empty entries dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def tt_shapes(value: str) -> tuple[str, list[int]]:
    """``INxOUT=a,b,...``: the TT factor shape of every ``IN x OUT`` matrix (product ``IN * OUT``)."""
    key, sep, modes = value.partition("=")
    size = key.lower().split("x")
    try:
        if not sep or len(size) != 2:
            raise ValueError
        in_out, shape = [int(n) for n in size], [int(m) for m in modes.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected INxOUT=a,b,... (e.g. 576x8=8,9,8,8)") from None
    if in_out[0] * in_out[1] != math.prod(shape):
        raise argparse.ArgumentTypeError(f"{value!r}: the modes multiply to {math.prod(shape)}, "
                                         f"not {key} = {in_out[0] * in_out[1]}")
    return f"{in_out[0]}x{in_out[1]}", shape


DENSE_CLASSIFIER_HELP = ("LoRETTA on sequence classification: train the classifier's hidden dense layer densely "
                         "instead of the papers' TT-linear head")
# The method options: flags that fill TrainConfig.method_options.
METHOD_FLAGS = {"rank": int, "tt_rank": int, "bottleneck": int, "alpha": float, "dropout": float, "init_mode": str,
                "target_modules": comma_list, "input_modules": comma_list}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field with a help text; only flags given on the command line override --config."""
    p.add_argument("--config", help="YAML file of TrainConfig keys; flags given here override it")
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{text} (default {default})")
        elif f.type.startswith("list["):
            p.add_argument(flag, type=lambda v: v.split(","), default=argparse.SUPPRESS, help=text)
        else:
            kind = f.metadata.get("type") or (type(default) if default is not None else str)
            choices = f.metadata.get("choices")
            choices = [c for c in choices if c is not None] if choices else None
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices,
                           help=f"{text} (default {default})")
    for name, kind in METHOD_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=f"method option {name} (see leanft.methods.OPTION_FIELDS)"
                       + (", comma-separated; default: found from the model's module names" if kind is comma_list else ""))
    p.add_argument("--tt-shapes", type=tt_shapes, nargs="+", default=argparse.SUPPRESS, metavar="INxOUT=a,b,...",
                   help="LoRETTA: TT factor shape of every IN x OUT matrix, e.g. 576x8=8,9,8,8 (default: factorised)")
    p.add_argument("--no-train-norms", dest="train_norms", action="store_false", default=argparse.SUPPRESS,
                   help="keep normalisation layers frozen (LoRETTA)")
    p.add_argument("--dense-classifier", dest="tt_classifier", action="store_false", default=argparse.SUPPRESS,
                   help=DENSE_CLASSIFIER_HELP)


def _yaml_place(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's explanation in one line (its own text spans several, with a copy of the line)."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error).splitlines()[0]


def train_config(args: argparse.Namespace, under: dict | None = None) -> TrainConfig:
    """The flags given, over the --config file's keys, over ``under`` (``leanft eval``: the run's data options;
    naming another data source there, --task, --train-file or --dataset, drops the run's whole source)."""
    values = {}
    if getattr(args, "config", None):
        try:
            values = yaml.safe_load(Path(args.config).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{args.config}{_yaml_place(e)}: not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: expected a mapping of TrainConfig keys")
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "adapter")}
    if "tt_shapes" in given:
        given["tt_shapes"] = dict(given["tt_shapes"])
    flags = {*METHOD_FLAGS, "train_norms", "tt_classifier", "tt_shapes"}
    options = {**values.pop("method_options", {}), **{k: given.pop(k) for k in list(given) if k in flags}}
    chosen = {**values, **given}
    under = dict(under or {})
    if chosen.keys() & {"task", "train_file", "dataset"}:
        under = {k: v for k, v in under.items() if k not in DATA_SOURCE}
    return TrainConfig.from_dict({**under, **chosen, "method_options": options})


# The other commands: each hands its arguments to the library function that does it.


def _method_options(args: argparse.Namespace) -> dict:
    return {
        "rank": args.rank,
        "tt_rank": args.tt_rank,
        "bottleneck": args.bottleneck,
        "train_norms": False if args.no_train_norms else None,
        "tt_classifier": False if args.dense_classifier else None,
        "target_modules": args.target_modules,
        "input_modules": args.input_modules,
    }


def cmd_params(args: argparse.Namespace) -> None:
    models.model_kind(args.model)  # an unknown name fails here, with the closest known one suggested
    names = params.method_names(args.method, args.model)
    note = params.weights_note(args.model, names, args.method)
    if args.show_ranks:
        result = params.lamda_rank_table(args.model, names, _method_options(args))
        print(note, file=sys.stderr if args.json else sys.stdout)  # JSON on stdout stays parseable
        if args.json:
            print(json.dumps(result, indent=2))
            return
        for method, ranks in result.items():
            print(f"{method}: {len(ranks)} modules, total rank {sum(ranks.values())}")
            print(report.text_table([{"module": k, "rank": v} for k, v in ranks.items()], ["module", "rank"]))
        return
    rows = params.count_rows(lambda method: params.builder(args.model, method)(), models.task_type(args.model),
                             names, _method_options(args))
    if args.json:
        data = [{"model": args.model, "method": r["method"], "trainable": r["trainable"], "total": r["total"]}
                for r in rows]
        print("\n".join([note] + [f"{r['method']} adapts {r['targets']}" for r in rows]), file=sys.stderr)
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    else:
        print(note + "\n" + report.text_table(rows, list(rows[0])))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import demo

    demo(args.model, prompt=args.prompt, answer=args.answer, steps=args.steps, lr=args.lr,
         max_new_tokens=args.max_new_tokens, output=args.output, options=_method_options(args))


def cmd_bench(args: argparse.Namespace) -> None:
    spent = budget.parse_budget(args.budget)
    out = Path(args.out or f"results/bench/{Path(args.model).name}-{models.default_device().type}")
    results = bench.Bench(args.model, args.tasks.split(","), params.method_names(args.methods, args.model), spent,
                          out, Path(args.work_dir) / out.name, [int(r) for r in args.ranks.split(",") if r],
                          params.method_names(args.sweep) if args.sweep else [], args.dtype, args.memory,
                          args.force, lr_grid=[float(m) for m in comma_list(args.lr_grid)],
                          seeds=[int(x) for x in comma_list(args.seeds)],
                          zo_optimizers=comma_list(args.zo_optimizers), zo_queries=args.zo_queries).run()
    failed = [r["bench"]["slug"] for r in results if r.get("failed")]
    if failed:
        sys.exit(f"leanft: error: {len(failed)} run(s) failed: {', '.join(failed)} (see {out / 'README.md'})")


def cmd_estimate(args: argparse.Namespace) -> None:
    from .measure import estimate, estimate_check

    names = lambda spec: tuple(spec.split(",")) if spec else None  # noqa: E731
    if args.check:
        result = estimate_check.check_all(names(args.models) or ("smollm2-135m", "minilm-l6"),
                                          names(args.methods) or estimate_check.CHECK_METHODS,
                                          args.batch_size or 8, args.seq_len or 128)
    else:
        result = estimate.paper_scale(names(args.models) or estimate.PAPER_MODELS,
                                      names(args.methods) or estimate.PAPER_METHODS, args.batch_size, args.seq_len,
                                      args.dtype, args.device, estimate.zo_optimizer_names(args.zo_optimizers))
    print(report.estimate_markdown(result))
    if result.get("zo_rows"):
        print(f"\nZeroth-order optimisers: full-model MeZO and MeZO-LoRA ({args.dtype} weights; MB; inference: "
              + ", ".join(f"{m} {mb:,.0f}" for m, mb in result["inference_mb"].items()) + ")")
        columns = ["model", "method", "zo_optimizer", "optimizer_mb", "activations_mb", "total_mb", "vs_inference"]
        rows = [{**r, **{k: f"{r[k]:,.0f}" for k in columns[3:6]},
                 "vs_inference": f"{r['total_mb'] / result['inference_mb'][r['model']]:.2f}"} for r in result["zo_rows"]]
        print(report.text_table(rows, columns))
    if result.get("notes"):
        print("".join(f"\nnote: {note}" for note in result["notes"]))
    if args.output:
        save(result, Path(args.output))
        print(f"saved {args.output}")


def cmd_micro(args: argparse.Namespace) -> None:
    from .measure import micro

    sizes = tuple(int(d) for d in args.hidden_sizes.split(","))
    results = {}
    if args.layers:
        results["layers"] = micro.layer_bench(sizes, tuple(args.methods.split(",")), args.tokens)
    if args.contractions:
        results["contractions"] = micro.contraction_bench(sizes, tuple(int(t) for t in args.contraction_tokens.split(",")))
    for kind, result in results.items():
        print(report.micro_markdown(result) + "\n")
        if args.output_dir:
            path = Path(args.output_dir) / f"micro-{kind}-{models.default_device().type}.json"
            save(result, path)
            print(f"saved {path}")


def cmd_forward(args: argparse.Namespace) -> None:
    result = steps.forward_times(args.model, tuple(args.methods.split(",")), args.batch, args.seq_len, args.repeats)
    print(f"{result['model']}: forward of batch {args.batch} x {args.seq_len} tokens on {result['machine']}, "
          f"median of {args.repeats}")
    show(result, list(result["rows"][0]), args.output)


def show(result: dict, columns: list[str], output: str | None) -> None:
    """A measurement's rows as a table, and its JSON written to ``output`` when given."""
    print(report.text_table([{c: r[c] for c in columns} for r in result["rows"]], columns))
    if output:
        save(result, Path(output))
        print(f"saved {output}")


def cmd_train(args: argparse.Namespace) -> None:
    cfg = train_config(args)
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: the main process reports
        return
    print(f"\n{metrics['model']} + {metrics['method']} on {','.join(metrics['tasks'])}")
    if metrics["eval_before"]:
        print(f"  before: {json.dumps(metrics['eval_before'])}")
    print(f"  after:  {json.dumps(metrics['eval'])}")
    print(f"  trainable parameters {metrics['trainable']:,} of {metrics['total']:,}; "
          f"peak memory {metrics['peak_memory_mb']:.0f} MB ({metrics['peak_memory_kind']}); "
          f"{metrics['steps']} steps, {metrics['time_per_step_s']} s/step, wall time {metrics['wall_time_s']:.0f} s")
    print(f"  metrics, curves and the best adapter: {cfg.output_dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_saved

    info = Path(args.adapter) / "leanft_run.json"  # its absence is evaluate_saved's error
    data = read_json(info).get("data") if info.is_file() else None
    cfg = train_config(args, under=rerun_data(data) if data else {"task": ""})  # no task: the run's, from the file
    print(json.dumps(evaluate_saved(args.adapter, cfg, getattr(args, "model", None)), indent=1))


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted ``leanft train``: its own arguments with --resume."""
    kept = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite", "--no-overwrite")]
    data_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    launcher = "torchrun <the same torchrun options> -m leanft.cli" if data_parallel else "leanft"
    return f"{launcher} {shlex.join(kept)} --resume"


def cmd_memory(args: argparse.Namespace) -> None:
    from .measure.estimate import zo_optimizer_names

    zo_optimizers = list(zo_optimizer_names(args.zo_optimizers)) if args.zo_optimizers else None
    result = steps.memory_compare(args.model, args.task, args.batch_size, args.steps,
                                  params.method_names(args.methods) if args.methods else None, args.dtype,
                                  zo_optimizers)
    columns = ["run", "peak_mb", "baseline_mb", "peak_vs_inference", "step_s", "trainable"]
    print(f"{args.model} on one {args.task} batch of {args.batch_size}: peak memory ({result['device']})")
    show(result, columns, args.output)


def cmd_steps(args: argparse.Namespace) -> None:
    import torch  # here: the other commands start without it

    from .system import machine

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.zo_cost:
        rows = [steps.zo_step_cost(args.model, args.task, method, dtype=dtype, batch_size=args.batch_size,
                                   queries=args.queries, repeats=args.steps, zo_optimizer=args.zo_optimizer,
                                   directions=directions)
                for method in params.method_names(args.methods) for dtype in args.dtype.split(",")
                for directions in args.zo_directions.split(",")]
        result = {"model": args.model, "task": args.task, "batch_size": args.batch_size, "machine": machine(),
                  "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows}
        print(f"{args.model} on one {args.task} batch of {args.batch_size}: a zeroth-order step against its forwards "
              f"({result['machine']}, {torch.get_num_threads()} thread(s))")
        show(result, ["method", "dtype", "directions", "queries", "forward_s", "step_s", "forwards", "vs_forwards",
                      "draw_s", "floor_s", "vs_floor"], args.output)
        return
    result = steps.step_times(args.model, args.task, params.method_names(args.methods), args.batch_size, args.steps)
    print(f"{args.model} on {args.task}, batch {args.batch_size}: seconds per training step ({result['machine']})")
    show(result, ["method", "queries", "step_s", "trainable"], args.output)


def cmd_report(args: argparse.Namespace) -> None:
    print(report.report([Path(p) for p in args.metrics]))
    if args.plot:
        report.plot_runs([Path(p) for p in args.metrics], Path(args.plot))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanft", description=__doc__.split("\n\n")[0])  # the rest is for readers
    sub = parser.add_subparsers(dest="command", required=True)

    def method_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rank", type=int, help="LoRA / LoRETTA_rep rank r (default 8)")
        p.add_argument("--tt-rank", type=int, help="TT rank (defaults: LoRETTA_adp 5, LoRETTA_rep 8)")
        p.add_argument("--bottleneck", type=int, help="LoRETTA_adp bottleneck size (default 64)")
        p.add_argument("--no-train-norms", action="store_true", help="keep normalisation layers frozen")
        p.add_argument("--dense-classifier", action="store_true", help=DENSE_CLASSIFIER_HELP)
        p.add_argument("--target-modules", type=comma_list, help="comma-separated module names")
        p.add_argument("--input-modules", type=comma_list, help="LoRETTA_adp: modules that get an input adapter "
                       "(comma-separated; default from the module names: gate_proj,up_proj on LLaMA-likes)")

    p = sub.add_parser("params", help="trainable / total parameters per method, from the model's config, no weights")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(models.BUILTIN_CONFIGS)}, or a local folder, "
                   "hub id or .gguf file (its config only; lamda++ loads the weights)")
    p.add_argument("--method", default="all", help=f"comma-separated, or 'all': {', '.join(methods.METHODS)}")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show-ranks", action="store_true", help="per-module ranks of lamda / lamda++")
    method_flags(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("demo", help="parameter table of every method on a real model, and generation through one")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--answer", default="Bonjour! Paris is the capital of France, said leanft.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--output", default="runs/demo-adapter", help="where the adapter is saved")
    method_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="fine-tune a model on a task and evaluate it (default: SmolLM2 + LoRETTA_rep on SST-2)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved adapter (a run's best/ folder) on its tasks or others")
    p.add_argument("--adapter", required=True, help="folder written by leanft train (OUTPUT_DIR/best)")
    add_train_flags(p)
    p.set_defaults(func=cmd_eval)

    def measurement(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--output", help="write the result as JSON here")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("bench", help="train and evaluate every method under one budget, side by side, and "
                                      "write per-run JSON and a Markdown report with plots")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="sst2", help="comma-separated built-in tasks")
    p.add_argument("--methods", default="all", help=f"comma-separated, or 'all': {', '.join(methods.METHODS)}")
    p.add_argument("--budget", default="quick", help="preset (smoke, quick, standard), then key=value overrides: "
                   "train, dev, eval, epochs, batch, forwards (zeroth-order, even), zo_batch, seed; "
                   "e.g. quick,forwards=600")
    p.add_argument("--ranks", default="", help="rank sweep, e.g. 2,4,8,16 (LoRA/LaMDA rank r, TT rank of "
                   "LoRETTA/AdaZeta), for the --sweep methods")
    p.add_argument("--sweep", default="lora,loretta-rep,loretta-adp", help="methods the --ranks sweep applies to")
    p.add_argument("--dtype", help="weights dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", help="result folder (default results/bench/MODEL-DEVICE)")
    p.add_argument("--work-dir", default="runs/bench", help="where the runs' checkpoints and logs go")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the peak memory of one step of each method against inference, and the time "
                   "of one training forward of each zeroth-order method (the report's step / forwards)")
    p.add_argument("--force", action="store_true", help="redo runs whose results exist")
    p.add_argument("--lr-grid", default="", help="multiples of each run group's default lr, e.g. 0.5,1,2: each "
                   "run (first- and zeroth-order) is trained at each and the lr with the best dev score kept (eval "
                   "never looked at); a choice at the grid's edge tries the next multiple beyond it (up to 3)")
    p.add_argument("--seeds", default="", help="repeat every run with these seeds, e.g. 0,1,2 (the lr chosen on "
                   "the first); the report gives mean and standard deviation")
    p.add_argument("--zo-optimizers", default="sgd", help="zeroth-order optimisers each zeroth-order method runs "
                   "with, one run group each (e.g. sgd,momentum,adam,sign,fzoo,hizoo,lozo,sparse; sgd is MeZO)")
    p.add_argument("--zo-queries", type=int, default=1, help="queries per zeroth-order step (raised to 2 for fzoo; "
                   "adazeta keeps its own schedule)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("estimate", help="training memory of each method on paper-scale models, estimated on the "
                                         "meta device without weights; --check compares with measured steps here")
    p.add_argument("--models", help="comma-separated (default llama-2-7b/13b/70b, roberta-large, deberta-base; "
                                    "with --check smollm2-135m, minilm-l6)")
    p.add_argument("--methods", help="comma-separated methods (default all but lamda++, which needs weights)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: LLaMA 1, encoders 16; --check 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: LLaMA 512, encoders 128; --check 128)")
    p.add_argument("--dtype", default="bfloat16", help="base weights dtype of the estimate (adapters stay float32)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="whose kernels the estimate assumes")
    p.add_argument("--check", action="store_true", help="run real steps of the packaged models on this machine "
                                                         "and state the estimate's error")
    p.add_argument("--zo-optimizers", default="all", help="also estimate full-model MeZO and MeZO-LoRA with these "
                   "zeroth-order optimizers (comma-separated, 'all' or 'none'; not with --check), with a note where "
                   "one needs more than LoRA with AdamW or 1.5x inference")
    p.add_argument("--output", help="write the result as JSON here")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("micro", help="forward and forward+backward time and memory of each adapter layer against "
                                      "PEFT LoRA at equal shapes, and the TT contractions against the automatic choice")
    p.add_argument("--hidden-sizes", default="576,1024,2048,4096,8192", help="square layer sizes d (d x d)")
    p.add_argument("--methods", default="lora,loretta-rep,loretta-adp,lamda",
                   help="layers to time (LoRA is the reference); a LoRETTA name with -zero, -noise-free or "
                        "-reference uses that start instead of the method's default")
    p.add_argument("--tokens", type=int, default=512, help="tokens per layer call (batch x sequence)")
    p.add_argument("--contraction-tokens", default="1,64,512,4096", help="token counts of the contraction timing")
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--contractions", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--output-dir", help="write micro-layers-DEVICE.json and micro-contractions-DEVICE.json here")
    p.set_defaults(func=cmd_micro)

    p = measurement("forward", "forward time of each method on a real model, side by side", cmd_forward)
    p.add_argument("--methods", default=",".join(steps.DEFAULT_METHODS), help="'base' is the model without adapter")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)

    p = measurement("memory", "peak memory of inference, zeroth-order and first-order steps, side by side", cmd_memory)
    p.add_argument("--task", default="sst2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", help="comma-separated methods to measure (default all); inference always runs")
    p.add_argument("--zo-optimizers", help="zeroth-order optimizers of the zeroth-order steps (comma-separated, "
                   "'all' or 'none'; default sgd): full-model MeZO and MeZO-LoRA are measured with each, e.g. "
                   "--methods mezo,mezo-lora --zo-optimizers sgd,adam")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="base weights dtype (trainable parameters float32, compute by autocast; MeZO full keeps it)")

    p = measurement("steps", "seconds per training step of each method (ZO: per number of queries)", cmd_steps)
    p.add_argument("--task", default="sst2")
    p.add_argument("--methods", default="full,lora,loretta-rep,loretta-adp,lamda,mezo,mezo-lora,adazeta")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--zo-cost", action="store_true",
                   help="zeroth-order methods only: one step against the forwards it takes and the random numbers it "
                        "draws (vs_forwards, vs_floor), in this process; --steps is the number of timed steps")
    p.add_argument("--dtype", default="float32", help="--zo-cost: comma-separated dtypes of the base weights")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--queries", type=int, default=1, help="--zo-cost: queries per step")
    p.add_argument("--zo-optimizer", default="sgd", help="--zo-cost: the zeroth-order optimiser")
    p.add_argument("--zo-directions", default="gaussian", help="--zo-cost: comma-separated direction kinds")

    p = sub.add_parser("report", help="Markdown table comparing finished runs (their metrics.json files)")
    p.add_argument("metrics", nargs="+", help="metrics.json files written by leanft train")
    p.add_argument("--plot", help="also draw their training loss against forward passes into this PNG "
                                  "(each X.json needs the run's metrics.jsonl beside it as X.jsonl)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retry notices; a failed fetch is one error line
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"leanft: error: {e}")
    except Interrupted as e:  # SIGINT / SIGTERM: a checkpoint was written at the step it stopped after
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"leanft: stopped by {e.signal} after step {e.step}; the checkpoint is in {e.out / 'checkpoint'}\n"
                  f"resume with: {resume_command(argv)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # a second signal: stopped at once
        print(f"leanft: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
