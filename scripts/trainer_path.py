"""SST-2 through the user's-script path: ``transformers.Trainer`` (or ``leanft.ZOTrainer``) on a leanft
config, evaluated with leanft's own scoring, to compare with ``leanft train`` on the same samples.

    python scripts/trainer_path.py --method loretta-rep --output results/trainer-path/loretta-rep.json
    python scripts/trainer_path.py --method adazeta --output results/trainer-path/adazeta.json

The user's objective is the usual one: language modelling of the gold answer after the prompt (prompt
tokens masked), where ``leanft train`` uses cross-entropy over the answer options. Same samples as
``leanft train`` (1000 train, 500 dev unused, 1000 eval, seed 0), one epoch at batch 8, linear schedule,
each method's default lr.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

import leanft
from leanft import methods, models, objectives, tasks
from leanft.config import DEFAULT_LR, TrainConfig
from leanft.evaluate import evaluate
from leanft.loading import Loaded, accelerator
from leanft.system import machine


def features(task: tasks.Task, examples: list[dict], tokenizer) -> list[dict]:
    """Prompt + gold answer, the labels masked (-100) on the prompt's tokens."""
    rows = []
    for ex in examples:
        prompt = tokenizer(task.prompt(ex)).input_ids
        ids = tokenizer(task.prompt(ex) + task.candidates(ex)[task.label(ex)]).input_ids
        shared = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * shared + ids[shared:]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="loretta-rep", choices=["loretta-rep", "loretta-adp", "lora", "adazeta",
                                                                "mezo-lora"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-eval", type=int, default=1000)
    p.add_argument("--output", required=True)
    args = p.parse_args()

    task = tasks.get_task(args.task)
    splits = tasks.load_splits(args.task, args.num_train, 500, args.num_eval, 0)
    model, tokenizer = models.load_model(args.model)
    model = get_peft_model(model, methods.make_config(args.method, "CAUSAL_LM"))  # leanft train's defaults
    zo = args.method in methods.ZO_METHODS
    lr = DEFAULT_LR["causal"][args.method]
    with tempfile.TemporaryDirectory() as work:
        training = TrainingArguments(output_dir=work, num_train_epochs=1, per_device_train_batch_size=8,
                                     learning_rate=lr, lr_scheduler_type="linear", weight_decay=0.0,
                                     save_strategy="no", logging_steps=25, report_to=[], seed=0,
                                     use_cpu=not models.default_device().type == "cuda")
        common = dict(model=model, args=training, train_dataset=features(task, splits.train, tokenizer),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer = (leanft.ZOTrainer(**common, zo_schedule="adazeta" if args.method == "adazeta" else "fixed")
                   if zo else Trainer(**common))
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
    cfg = TrainConfig(model=args.model, method=args.method, task=args.task, num_eval=args.num_eval)
    loaded = Loaded(model, objectives.network(model, True), tokenizer, True, accelerator(), cfg)
    accuracy = evaluate(loaded, task, splits.eval)
    report = {"path": "ZOTrainer" if zo else "Trainer", "model": args.model, "method": args.method, "task": args.task,
              "num_train": args.num_train, "num_eval": args.num_eval, "lr": lr, "steps": result.global_step,
              "eval": accuracy, "train_time_s": round(seconds, 1),
              "time_per_step_s": round(seconds / max(result.global_step, 1), 3), "train_loss": result.training_loss,
              "machine": machine()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["eval"]), report["time_per_step_s"], "s/step")


if __name__ == "__main__":
    main()
