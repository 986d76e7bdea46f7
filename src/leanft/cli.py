"""The ``leanft`` command line: ``params`` (counts without weights) and ``demo`` (methods on a real model)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from . import bench, methods, models

TASK_TYPE = {"causal": "CAUSAL_LM", "encoder": "SEQ_CLS"}


def _method_options(args: argparse.Namespace) -> dict:
    return {
        "rank": args.rank,
        "tt_rank": args.tt_rank,
        "bottleneck": args.bottleneck,
        "train_norms": False if args.no_train_norms else None,
    }


def _options_for(method: str, options: dict) -> dict:
    """Only the options this method takes (a shared flag like --tt-rank does not apply to LoRA)."""
    return {k: v for k, v in options.items() if k in methods.OPTION_FIELDS[method]}


def _task_type(name: str) -> str:
    return TASK_TYPE[models.MODEL_KIND.get(name, "causal")]


def _methods(spec: str) -> list[str]:
    return list(methods.METHODS) if spec == "all" else [methods.resolve_method(m) for m in spec.split(",")]


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def count_rows(build, task_type: str, method_names: list[str], options: dict) -> list[dict]:
    """Parameter counts of each method on a fresh model from ``build()``."""
    rows = []
    for method in method_names:
        model = methods.apply_method(build(), method, task_type, **_options_for(method, options))
        counts = methods.count_parameters(model)
        rows.append({"method": method, **counts, "trainable %": f"{100 * counts['trainable'] / counts['total']:.4f}"})
    return rows


def cmd_params(args: argparse.Namespace) -> None:
    rows = count_rows(lambda: models.meta_model(args.model), _task_type(args.model), _methods(args.method),
                      _method_options(args))
    if args.json:
        data = [{"model": args.model, "method": r["method"], "trainable": r["trainable"], "total": r["total"]}
                for r in rows]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    else:
        print(f"{args.model} (built on the meta device, no weights)\n" + _table(rows, list(rows[0])))


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job until the trainer lands: every method on a real model, and one adapter end to end.

    Teaches LoRETTA_rep one new answer in a few AdamW steps, then shows the answer through the adapted
    model, the adapter saved and reloaded with ``PeftModel.from_pretrained``, and the merged plain model.
    """
    from peft import PeftModel

    t0 = time.perf_counter()
    fresh = lambda: models.load_model(args.model)[0].eval()  # noqa: E731
    _, tokenizer = models.load_model(args.model)
    task_type = _task_type(args.model)
    options = _method_options(args)
    rows = count_rows(fresh, task_type, list(methods.METHODS), options)
    print(f"{args.model}: parameters per method\n" + _table(rows, list(rows[0])))
    if task_type != "CAUSAL_LM":
        return
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": args.answer}],
                                         return_tensors="pt", return_dict=True)
    labels = full["input_ids"].clone()
    labels[:, : prompt["input_ids"].shape[1]] = -100  # loss on the answer only

    def generate(m) -> str:
        with torch.no_grad():
            out = m.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    torch.manual_seed(0)
    model = methods.apply_method(fresh(), "loretta-rep", task_type, **_options_for("loretta-rep", options))
    print(f"\nprompt: {args.prompt}\nbase model / LoRETTA_rep at its noise-free start: {generate(model)}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step in range(args.steps):
        loss = model(**full, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    print(f"after {args.steps} AdamW steps on one example (loss {loss.item():.4f}): {generate(model)}")
    out_dir = Path(args.output)
    model.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    reloaded = PeftModel.from_pretrained(fresh(), out_dir).eval()
    print(f"saved to {out_dir} ({size / 1024:.0f} KiB), reloaded: {generate(reloaded)}")
    merged = reloaded.merge_and_unload()
    print(f"merged into a plain {type(merged).__name__}: {generate(merged)}")
    print(f"total time {time.perf_counter() - t0:.1f} s")


def cmd_bench(args: argparse.Namespace) -> None:
    result = bench.forward_times(args.model, tuple(args.methods.split(",")), args.batch, args.seq_len, args.repeats)
    print(f"{result['model']}: forward of batch {args.batch} x {args.seq_len} tokens on {result['machine']}, "
          f"median of {args.repeats}")
    print(_table(result["rows"], list(result["rows"][0])))
    if args.output:
        bench.save(result, Path(args.output))
        print(f"saved {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def method_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rank", type=int, help="LoRA / LoRETTA_rep rank r (default 8)")
        p.add_argument("--tt-rank", type=int, help="TT rank (defaults: LoRETTA_adp 5, LoRETTA_rep 8)")
        p.add_argument("--bottleneck", type=int, help="LoRETTA_adp bottleneck size (default 64)")
        p.add_argument("--no-train-norms", action="store_true", help="keep normalisation layers frozen")

    p = sub.add_parser("params", help="trainable / total parameters per method, from a built-in config, no weights")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(models.BUILTIN_CONFIGS)}")
    p.add_argument("--method", default="all", help=f"comma-separated, or 'all': {', '.join(methods.METHODS)}")
    p.add_argument("--json", action="store_true", help="print JSON")
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

    p = sub.add_parser("bench", help="forward time of each method on a real model, side by side")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=",".join(bench.DEFAULT_METHODS), help="'base' is the model without adapter")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", help="write the result as JSON here")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        args.func(args)
    except ValueError as e:
        sys.exit(f"leanft: error: {e}")


if __name__ == "__main__":
    main()
