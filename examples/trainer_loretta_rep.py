"""LoRETTA_rep inside your own ``transformers.Trainer`` script: a PEFT config like any other.

    python examples/trainer_loretta_rep.py                      # SmolLM2-135M, SST-2 as text, 50 steps
    python examples/trainer_loretta_rep.py --model path/to/model --steps 200 --bf16

The model learns ``review + " It was great/terrible"`` as plain language modelling; the adapter it
saves loads back with ``PeftModel.from_pretrained``. ``--bf16`` loads the base model in bfloat16 and
computes in it; the TT cores and trainable norms stay float32.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import leanft
from leanft import tasks


def sst2_texts(n: int) -> list[str]:
    task = tasks.get_task("sst2")
    return [task.prompt(ex) + task.candidates(ex)[task.label(ex)] for ex in tasks.load_splits("sst2", n, 0, 0).train]


def main(argv: list[str] | None = None) -> Trainer:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a leanft model name, a local folder or a hub id")
    p.add_argument("--output-dir", default="runs/example-trainer-loretta-rep")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = p.parse_args(argv)

    model, tokenizer = leanft.models.load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = get_peft_model(model, leanft.LorettaRepConfig(task_type="CAUSAL_LM", r=8, tt_rank=5))
    model.print_trainable_parameters()
    data = [tokenizer(text) for text in sst2_texts(args.examples)]
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=10,
                                 save_steps=max(1, args.steps // 2), bf16=args.bf16, report_to=[], seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train(resume_from_checkpoint=args.resume or None)
    model.save_pretrained(f"{args.output_dir}/adapter")
    return trainer


if __name__ == "__main__":
    main()
